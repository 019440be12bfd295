"""`muscle-lora analyze`: train methods on the built-in demo while recording the frequency analysis, then plot it.

    muscle-lora analyze                          # lora and muscle-ga, every 25 steps, 64 + 64 probe samples
    muscle-lora analyze --methods lora --every 10 --train-size 1200
    muscle-lora analyze --replot muscle-lora-analyze/frequency.csv --sigma 0.1

Writes to --output: frequency.csv (the recorder's tidy rows), frequency.png (the picture), results.json and
results.png (the methods' CACC / ASR, as `demo` writes them). The probe sets are fixed samples of the poisoned
training set: "clean" (untouched samples with their true labels) and "poisoned" (triggered samples, labelled with
the target), the data the model is fitting while the backdoor is (or is not) learned.
"""

from __future__ import annotations

import argparse
import os
import random

from ..analysis.recorder import (
    DEFAULT_EVERY,
    DEFAULT_SIGMAS_REL,
    FrequencyRecorder,
    Probe,
    read_rows,
)
from ..defense.data import Sample
from ..defense.train import Splits

__all__ = ["add_parser", "run", "probe_sets"]

DEFAULT_METHODS = ("lora", "muscle-ga")
DEFAULT_PROBE_SIZE = 64


def probe_sets(
    splits: Splits,
    tokenizer,
    *,
    size: int = DEFAULT_PROBE_SIZE,
    seed: int = 0,
    max_length: int = 64,
    batch_size: int = 128,
) -> dict[str, Probe]:
    """Fixed probe sets drawn from the training data: {"clean": ..., "poisoned": ...} (poisoned only when the
    training set has poisoned samples), at most `size` samples each, the same for every method."""
    if size < 2:
        raise ValueError(f"size: a probe set needs at least 2 samples, got {size}")
    rng = random.Random(seed)
    groups = {"clean": [s for s in splits.train if not s.poisoned], "poisoned": [s for s in splits.train if s.poisoned]}
    probes = {}
    for name, samples in groups.items():
        if len(samples) < 2:
            continue
        chosen: list[Sample] = rng.sample(samples, min(size, len(samples)))
        probes[name] = Probe.from_texts(
            tokenizer, [s.text for s in chosen], [s.label for s in chosen], batch_size=batch_size, max_length=max_length
        )
    if not probes:
        raise ValueError("train: fewer than 2 samples; no probe set can be drawn")
    return probes


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive numbers such as 0.05,0.1,0.2, got {text!r}"
        )
    return values


def add_parser(subparsers, *, training_options, methods_type, positive_int, fraction) -> argparse.ArgumentParser:
    """The `analyze` subcommand; cli/__init__.py passes its shared option helpers and argument types."""
    from ..defense.demo import DEMO_SETTINGS, DEMO_SIZES
    from ..defense.train import Settings

    p = subparsers.add_parser(
        "analyze",
        help="record and plot the frequency analysis of training (the paper's Fourier view)",
        description="Fine-tunes the methods on the built-in demo (all-MiniLM-L6-v2, the shipped review corpus, "
        "BadNets) and, every --every optimizer steps, filters the model's output probabilities on fixed "
        "clean and poisoned training samples with Gaussian filters K over their mean input embeddings "
        "(docs/frequency.md). It records ||K f||, ||f - K f||, their ratio and the relative errors against "
        "the labels per band to frequency.csv, and draws frequency.png: the ratio against the step for "
        "each method and subset. A backdoor is a low-frequency mapping: on the poisoned subset, the "
        "ratio rising early means the trigger is being learned.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--methods",
        type=methods_type,
        default=list(DEFAULT_METHODS),
        help="comma-separated methods to train and record",
    )
    p.add_argument(
        "--every",
        type=positive_int,
        default=DEFAULT_EVERY,
        help="record every this many optimizer steps (and before the first); at the default a record "
        "costs a few percent of the training time",
    )
    p.add_argument(
        "--probe-size", type=positive_int, default=DEFAULT_PROBE_SIZE, help="samples per probe set (clean, poisoned)"
    )
    p.add_argument(
        "--sigmas",
        type=_floats,
        default=list(DEFAULT_SIGMAS_REL),
        help="filter widths, as multiples of the median distance between the probe inputs",
    )
    p.add_argument(
        "--sigma", type=float, default=None, help="the width to plot (one of --sigmas; default the middle one)"
    )
    p.add_argument(
        "--train-size",
        type=positive_int,
        default=DEMO_SIZES[0],
        help="training samples taken from the corpus (fewer: a faster run)",
    )
    p.add_argument("--poison-rate", type=fraction, default=0.1)
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="of the filter: auto is the Triton kernel on CUDA, the chunked torch path on the CPU",
    )
    p.add_argument(
        "--replot",
        metavar="CSV",
        default=None,
        help="only redraw the picture from an existing frequency.csv (no training)",
    )
    training_options(p, {**Settings().to_dict(), **DEMO_SETTINGS})
    p.set_defaults(output=None)  # run(): muscle-lora-analyze; --replot: the CSV's folder
    return p


def _replot(args) -> int:
    """--replot CSV: redraw frequency.png from a recorder file into --output (default: the CSV's folder), under
    a run's rules: the folder locked, a frequency.png that no run of ours wrote refused, a link replaced."""
    from ..analysis.plot import plot_frequency
    from ..defense.output import read_manifest, write_manifest
    from .output import CliError, prepare_output

    rows = _read_recorder_file(args.replot)
    try:
        _check_sigma(rows, args.sigma)
    except ValueError as e:
        raise CliError(f"--sigma: {e}") from None
    if args.output is None:
        args.output = os.path.dirname(os.path.abspath(args.replot))
    # the folder may hold the CSV and a run's other files: only frequency.png is written, and only over our own
    keep, args.overwrite = args.overwrite, True
    try:
        prepare_output(args, ("frequency.png",))
    finally:
        args.overwrite = keep
    write_manifest(args.output, read_manifest(args.output) | {"frequency.png"})
    png = plot_frequency(rows, os.path.join(args.output, "frequency.png"), sigma_rel=args.sigma)
    print(f"plot in {png}")
    return 0


def _check_sigma(rows, sigma) -> None:
    import math

    if sigma is None:
        return
    widths = sorted({r["sigma_rel"] if not math.isnan(r["sigma_rel"]) else r["sigma"] for r in rows})
    if not any(math.isclose(sigma, w, rel_tol=1e-9) for w in widths):
        raise ValueError(f"{sigma:g} was not recorded (recorded: {', '.join(f'{w:g}' for w in widths)})")


def _read_recorder_file(path: str) -> list:
    """The rows of --replot's CSV, or one line naming the file (never its content: it may be any file)."""
    import csv

    from .output import CliError

    if not os.path.isfile(path):
        raise CliError(f"--replot: {path}: no such file")
    try:
        rows = read_rows(path)
    except UnicodeDecodeError:
        raise CliError(
            f"--replot: {path} is not a frequency.csv written by muscle-lora analyze (not UTF-8 text)"
        ) from None
    except (ValueError, csv.Error, OSError, RecursionError) as e:
        reason = getattr(e, "strerror", None) or "not the recorder's columns"
        raise CliError(f"--replot: {path} is not a frequency.csv written by muscle-lora analyze ({reason})") from None
    if not rows:
        raise CliError(f"--replot: {path} has no rows (an empty frequency.csv?)")
    return rows


def run(args) -> int:
    from .output import CliError, checked_demo_splits, claim_output, prepare_output, run_outputs

    if args.replot:
        return _replot(args)
    if args.output is None:
        args.output = "muscle-lora-analyze"
    if args.sigma is not None and not any(abs(args.sigma - s) <= 1e-9 * s for s in args.sigmas):
        raise CliError(f"--sigma: {args.sigma} is not one of --sigmas {args.sigmas}")
    import time

    from ..analysis.plot import plot_frequency
    from ..defense.demo import DEMO_SIZES, minilm_factory
    from ..defense.train import run_methods

    settings = args.settings
    splits = checked_demo_splits(args, (args.train_size, DEMO_SIZES[1], DEMO_SIZES[2]))
    # defend's checks, before anything loads: locked, a non-empty folder refused unless --overwrite, and --overwrite
    # removes only what runs of ours wrote
    # (save_models=False below: no method folders)
    prepare_output(args, run_outputs((), extra=("frequency.csv", "frequency.png")))
    try:
        factory, tokenizer = minilm_factory()
    except ImportError as e:  # the pretrained weights come from the optional `demo` extra
        raise CliError(f"analyze: {' '.join(str(e).split())}") from None
    probes = probe_sets(
        splits,
        tokenizer,
        size=args.probe_size,
        seed=args.seed,
        max_length=settings.max_length,
        batch_size=settings.eval_batch_size,
    )
    claim_output(args)  # clears what earlier runs of ours wrote (frequency.csv included: rows would mix)
    csv_path = os.path.join(args.output, "frequency.csv")
    recorder = FrequencyRecorder(csv_path, probes, every=args.every, sigmas_rel=args.sigmas, backend=args.backend)
    print(
        f"muscle-lora analyze: {len(splits.train)} training reviews "
        f"({sum(s.poisoned for s in splits.train)} poisoned), methods {', '.join(args.methods)}, probe sets "
        + ", ".join(f"{k} {len(v)}" for k, v in probes.items())
        + f", recording every {args.every} steps"
    )
    start = time.perf_counter()
    results = run_methods(
        args.methods,
        factory,
        tokenizer,
        splits,
        settings,
        output_dir=args.output,
        save_models=False,
        progress=not args.no_progress,
        on_step=recorder,
        extra=dict(
            data="built-in review corpus",
            attack="badnets",
            poison_rate=args.poison_rate,
            model="all-MiniLM-L6-v2",
            frequency_every=args.every,
            frequency_probe_size=args.probe_size,
        ),
    )
    png = plot_frequency(read_rows(csv_path), os.path.join(args.output, "frequency.png"), sigma_rel=args.sigma)
    train_s = sum(r["train_seconds"] for r in results)
    print()
    for r in results:
        if r.get("diverged"):  # nothing measured: never print a broken model's numbers as a defense's
            print(f"{r['method']:<10} diverged ({r.get('diverged_reason', '')})  train {r['train_seconds']:.0f} s")
            continue
        print(
            f"{r['method']:<10} CACC {100 * r['cacc']:6.2f}%  ASR {100 * r['asr']:6.2f}%  "
            f"train {r['train_seconds']:.0f} s"
        )
    print(
        f"\nrecording: {recorder.records} records in {recorder.seconds:.1f} s = "
        f"{100 * recorder.seconds / max(train_s, 1e-9):.1f}% of the {train_s:.0f} s of training steps; "
        f"total {time.perf_counter() - start:.0f} s"
    )
    print(f"rows in {csv_path}, plot in {png}")
    from .output import all_diverged

    return all_diverged(results)
