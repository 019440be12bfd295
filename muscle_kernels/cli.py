"""`muscle-lora`: defended fine-tuning from the command line.

    muscle-lora demo                      # built-in: MiniLM on the shipped review corpus, BadNets 10%, offline
    muscle-lora analyze                   # the same, recording and plotting the frequency analysis (frequency.png)
    muscle-lora defend --model bert-base-uncased --data poison_data/sst-2/1/badnets --method muscle-ga
    muscle-lora defend --model ./my-model --train train.csv --dev dev.csv --test-clean test.csv \\
        --attack badnets --poison-rate 0.1 --target-label 1 --method lora,muscle-ga

Both print a table (CACC, ASR, time per method) and write results.json, results.png and the adapters to --output.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _number(convert, ok, expected: str):
    """An argparse type: `convert` the text, accept it when `ok(value)`, else say what was `expected`."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")  # NaN fails both compares
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]")


def _band(text: str) -> List[float]:
    try:
        band = [float(k) for k in text.split(",")]
    except ValueError:
        band = []
    if not band or any(not k > 0 or k == float("inf") for k in band):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers such as 1,2,3,4, got {text!r}")
    return [int(k) if k.is_integer() else k for k in band]


def _methods(text: str) -> List[str]:
    from .defense.train import METHODS

    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(METHODS)} (or 'all'), "
                                         f"got {text!r}")
    return names


def _add_training_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=defaults["epochs"])
    g.add_argument("--lr", type=_positive_float, default=defaults["lr"], help="learning rate of the adapter methods")
    g.add_argument("--vanilla-lr", type=_positive_float, default=defaults["vanilla_lr"],
                   help="learning rate of full fine-tuning")
    g.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"])
    g.add_argument("--max-length", type=_positive_int, default=defaults["max_length"], help="tokens per sample")
    g.add_argument("--ref-size", type=_positive_int, default=defaults["ref_size"],
                   help="clean reference samples for muscle-ga, taken from dev")
    g.add_argument("--ref-batch-size", type=_positive_int, default=defaults["ref_batch_size"])
    g.add_argument("--ref-select", choices=("random", "kmeans"), default="random")
    g.add_argument("--min-ref-loss", type=float, default=defaults["min_ref_loss"],
                   help="alignment gate: align while the reference loss is above this")
    g.add_argument("--freq-band", type=_band, default=defaults["freq_band"],
                   help="radial scales of the multi-scale head, e.g. 1,2,3,4 (default: the recipe's, or the demo's)")
    g.add_argument("--seed", type=int, default=defaults["seed"])
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--output", default=None, help="directory for results.json, results.png and the adapters")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .defense.demo import DEMO_METHODS, DEMO_SETTINGS
    from .defense.train import Settings

    parser = argparse.ArgumentParser(prog="muscle-lora", description="Backdoor-robust fine-tuning with MuScleLoRA.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,defend,analyze}")
    sub.required = True

    demo = sub.add_parser("demo", help="the built-in experiment (offline, a few minutes on a CPU)",
                          description="all-MiniLM-L6-v2 on the shipped review corpus poisoned with BadNets at 10%%; "
                                      "compares the methods and writes results.json and a plot.")
    demo.add_argument("--methods", type=_methods, default=list(DEMO_METHODS),
                      help=f"comma-separated (default {','.join(DEMO_METHODS)})")
    demo.add_argument("--poison-rate", type=_fraction, default=0.1)
    _add_training_options(demo, {**Settings().to_dict(), **DEMO_SETTINGS})
    demo.set_defaults(output="muscle-lora-demo")

    d = sub.add_parser("defend", help="fine-tune your own model on your own (possibly poisoned) data")
    d.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    src = d.add_argument_group("data (--data DIR, or files)")
    src.add_argument("--data", help="a folder in the paper's format (train-poison.csv, dev-clean.csv, test-clean.csv, "
                                    "test-poison.csv)")
    src.add_argument("--train", help="training file (.csv/.tsv/.jsonl; poisoned already, or clean with --attack)")
    src.add_argument("--dev", help="clean dev file (best epoch, and the reference set of muscle-ga)")
    src.add_argument("--test-clean", help="clean test file (CACC)")
    src.add_argument("--test-poison", help="poisoned test file (ASR); built from --test-clean with --attack")
    src.add_argument("--text-column", default="text")
    src.add_argument("--label-column", default="label")
    atk = d.add_argument_group("attack (poison clean data yourself)")
    atk.add_argument("--attack", choices=("badnets", "addsent"))
    atk.add_argument("--poison-rate", type=_fraction, default=0.1)
    atk.add_argument("--target-label", type=int, default=1)
    atk.add_argument("--clean-label", action="store_true", help="poison target-class samples, keep their labels")
    d.add_argument("--method", type=_methods, default=["muscle-ga"],
                   help="vanilla, lora, muscle, muscle-ga, a comma-separated list, or all (default muscle-ga)")
    d.add_argument("--num-labels", type=_positive_int, default=None, help="default: the largest label + 1")
    _add_training_options(d, Settings().to_dict())
    d.set_defaults(output="muscle-lora-output")
    from .defense import frequency_run

    frequency_run.add_parser(sub, training_options=_add_training_options, methods_type=_methods,
                             positive_int=_positive_int, fraction=_fraction)
    return parser


def _settings(args):
    from .defense.train import Settings

    return Settings(epochs=args.epochs, lr=args.lr, vanilla_lr=args.vanilla_lr, batch_size=args.batch_size,
                    max_length=args.max_length, ref_size=args.ref_size, ref_batch_size=args.ref_batch_size,
                    ref_select=args.ref_select, min_ref_loss=args.min_ref_loss, freq_band=args.freq_band,
                    seed=args.seed, device=args.device)


def _load_splits(args, parser):
    from .defense import attacks
    from .defense.data import load_file, load_paper_dir
    from .defense.train import Splits

    files = dict(text_column=args.text_column, label_column=args.label_column)
    if args.data:
        if args.train or args.test_clean or args.test_poison:
            parser.error("--data: give either --data DIR or the files (--train, --test-clean, ...), not both")
        found = load_paper_dir(args.data)
        if "dev" not in found:
            parser.error(f"--data: {args.data} has no dev-clean.csv; muscle-ga and best-epoch selection need it")
        if args.attack:
            parser.error("--attack: the paper's folders are poisoned already; use --attack with clean --train files")
        return Splits(train=found["train"], dev=found["dev"], test_clean=found["test_clean"],
                      test_poison=found["test_poison"], dev_poison=found.get("dev_poison", []))
    if not args.train or not args.test_clean:
        parser.error("defend: give --data DIR, or --train FILE and --test-clean FILE")
    train = load_file(args.train, **files)
    test_clean = load_file(args.test_clean, **files)
    dev = load_file(args.dev, **files) if args.dev else None
    if args.attack:
        attack = attacks.make_attack(args.attack)
        if dev is None:  # hold out clean samples before poisoning: the reference set must be clean
            order = list(range(len(train)))
            random.Random(args.seed).shuffle(order)
            n_dev = max(args.ref_size + 50, len(train) // 10)
            if n_dev >= len(train) // 2:
                parser.error(f"--train: {len(train)} samples are too few to hold out a clean dev set of {n_dev}; "
                             "give --dev")
            dev = [train[i] for i in sorted(order[:n_dev])]
            train = [train[i] for i in sorted(order[n_dev:])]
        train = attacks.poison_train(train, attack, rate=args.poison_rate, target_label=args.target_label,
                                     clean_label=args.clean_label, seed=args.seed)
        test_poison = (load_file(args.test_poison, **files) if args.test_poison else
                       attacks.poison_test(test_clean, attack, target_label=args.target_label, seed=args.seed + 1))
        dev_poison = attacks.poison_test(dev, attack, target_label=args.target_label, seed=args.seed + 2)
    else:
        if not args.test_poison:
            parser.error("--test-poison: needed to measure ASR (or pass --attack to poison clean data yourself)")
        if dev is None:
            parser.error("--dev: a clean dev set is needed (best epoch and the muscle-ga reference set); "
                         "or pass --attack to hold one out of clean --train data")
        test_poison = load_file(args.test_poison, **files)
        dev_poison = []
    return Splits(train=train, dev=dev, test_clean=test_clean, test_poison=test_poison, dev_poison=dev_poison)


def format_table(results) -> str:
    lines = [f"{'method':<10} {'CACC':>7} {'ASR':>7} {'best ep':>7} {'train s':>8} {'step s':>7}"]
    for r in results:
        lines.append(f"{r['method']:<10} {100 * r['cacc']:>6.2f}% {100 * r['asr']:>6.2f}% {r['best_epoch']:>7d} "
                     f"{r['train_seconds']:>8.1f} {r['step_seconds']:>7.3f}")
    return "\n".join(lines)


def _run(args, splits, factory, tokenizer, methods, extra, save_vanilla=True) -> int:
    from .defense.train import run_methods

    settings = args.settings
    start = time.perf_counter()
    results = run_methods(methods, factory, tokenizer, splits, settings, output_dir=args.output,
                          save_vanilla=save_vanilla, progress=not args.no_progress, extra=extra)
    print()
    print(format_table(results))
    print(f"\n{len(methods)} method(s) in {time.perf_counter() - start:.0f} s; results in "
          f"{os.path.join(args.output, 'results.json')}, plot in {os.path.join(args.output, 'results.png')}")
    return 0


def _demo(args) -> int:
    import torch

    from .defense.demo import demo_splits, minilm_factory

    splits = demo_splits(poison_rate=args.poison_rate, seed=args.seed)
    factory, tokenizer = minilm_factory()
    print(f"muscle-lora demo: all-MiniLM-L6-v2, {len(splits.train)} training reviews "
          f"({sum(s.poisoned for s in splits.train)} poisoned with BadNets), methods {', '.join(args.methods)}, "
          f"{torch.get_num_threads()} CPU threads" + (", CUDA" if torch.cuda.is_available() else ""))
    return _run(args, splits, factory, tokenizer, args.methods,
                extra=dict(data="built-in review corpus", attack="badnets", poison_rate=args.poison_rate,
                           model="all-MiniLM-L6-v2"),
                save_vanilla=False)  # the adapters are small; a fully fine-tuned copy of the model is not


def _defend(args, parser) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    splits = _load_splits(args, parser)
    num_labels = args.num_labels or max(2, 1 + max(s.label for s in splits.train + splits.test_clean))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:  # decoder LLMs ship without a padding token
        tokenizer.pad_token = tokenizer.eos_token

    def factory():
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    return _run(args, splits, factory, tokenizer, args.method,
                extra=dict(model=args.model, data=args.data or args.train, attack=args.attack,
                           poison_rate=args.poison_rate if args.attack else None))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .defense.data import DataError

    try:  # settings that argparse's types cannot check alone (e.g. a negative --min-ref-loss)
        args.settings = _settings(args)
    except ValueError as e:
        parser.error(str(e))

    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "analyze":
            from .defense import frequency_run

            return frequency_run.run(args)
        return _defend(args, parser)
    except (DataError, FileNotFoundError) as e:
        print(f"muscle-lora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
