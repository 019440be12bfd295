"""The command line's shared pieces: its one-line error, and the output folder every command writes (checked, locked
and recorded before anything loads; see `prepare_output`). Used by the subcommands in this package only."""

from __future__ import annotations

import os
import sys

__all__ = [
    "CliError",
    "one_line",
    "run_outputs",
    "prepare_output",
    "claim_output",
    "settle_output",
    "checked_demo_splits",
    "all_diverged",
]


class CliError(Exception):
    """Bad command-line input: main() prints it as one line naming the option and exits with code 2."""


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# what a run writes into --output: the record, the plot, one folder per method whose model is saved
def run_outputs(methods, *, save_vanilla: bool = True, extra=()) -> tuple:
    folders = tuple(m for m in methods if save_vanilla or m != "vanilla")
    screened = ("suspects.csv",) if "muscle-screen" in methods else ()  # every training row's suspicion
    return ("results.json", "results.png") + screened + folders + tuple(extra)


def prepare_output(args, names) -> None:
    """Create --output, prove it writable and lock it (one run per folder) before anything loads; refuse a
    non-empty folder unless --overwrite, and with --overwrite refuse to write over anything no run of ours wrote.
    Clearing (claim_output) waits until the model has loaded. `names`: the entries this run will write."""
    import tempfile

    from ..defense.output import BOOKKEEPING, MANIFEST, OutputError, lock_folder, read_manifest

    path, overwrite = args.output, args.overwrite
    if path is None or not str(path).strip():
        raise CliError(f"--output: expected a directory path, got {path!r}")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CliError(f"--output: {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".muscle-lora-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CliError(f"--output: cannot write to {path} ({e.strerror or e})") from None
    try:
        args.output_lock = lock_folder(path)  # released when main returns (or the process dies)
        entries = sorted(e for e in os.listdir(path) if e not in BOOKKEEPING)
        if entries and not overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise CliError(
                f"--output: {path} is not empty ({shown}); pass --overwrite to replace an earlier run's "
                "results, or choose another directory"
            )
        ours = read_manifest(path)
    except OutputError as e:
        raise CliError(str(e)) from None
    foreign = [n for n in names if os.path.lexists(os.path.join(path, n)) and n not in ours]
    if foreign:
        raise CliError(
            f"--overwrite: {path} holds {', '.join(foreign)}, which no muscle-lora run recorded writing "
            f"(in {MANIFEST}); it is left alone -- move it away or choose another directory"
        )
    args.output_names = tuple(names)


def claim_output(args) -> None:
    """Just before the run writes: with --overwrite remove what earlier runs of ours recorded (and their killed
    writes' temporary files), nothing else; then record the names this run is about to write."""
    import shutil

    from ..defense.output import OutputError, is_stray_temp, read_manifest, write_manifest

    path, names = args.output, args.output_names
    try:
        ours = read_manifest(path)
    except OutputError as e:
        raise CliError(str(e)) from None
    if args.overwrite:
        for name in sorted(os.listdir(path)):
            if name not in ours and not is_stray_temp(name, ours | set(names)):
                continue
            full = os.path.join(path, name)
            try:
                if os.path.islink(full) or not os.path.isdir(full):  # symlinks are removed, never followed
                    os.unlink(full)
                else:
                    shutil.rmtree(full)
            except OSError as e:
                raise CliError(f"--overwrite: cannot remove {full} ({e.strerror or e})") from None
        ours = set()
    write_manifest(path, ours | set(names))


def checked_demo_splits(args, sizes=None):
    """demo_splits with what it would refuse (a --poison-rate above the non-target share, a --train-size beyond the
    corpus) said in terms of the options, before anything is written or loaded."""
    from ..defense.corpus import load_builtin_corpus
    from ..defense.demo import DEMO_SIZES, demo_splits

    given, sizes = sizes, tuple(sizes or DEMO_SIZES)
    rows = load_builtin_corpus()
    room = len(rows) - sizes[1] - sizes[2]
    if sizes[0] > room:
        raise CliError(
            f"--train-size: {sizes[0]} training reviews asked for, the built-in corpus has {room} beside "
            f"its dev and test sets (at most {room})"
        )
    train = rows[: sizes[0]]
    pool = sum(label != 1 for _, label in train)  # the demo's target label is 1
    n_poison = int(round(args.poison_rate * len(train)))
    if n_poison > pool:
        raise CliError(
            f"--poison-rate: {args.poison_rate:g} asks for {n_poison} poisoned training reviews, but only "
            f"{pool} of the {len(train)} are of a non-target class; at most {pool / len(train):.3f}"
        )
    return demo_splits(poison_rate=args.poison_rate, seed=args.seed, **({"sizes": sizes} if given else {}))


def settle_output(args) -> None:
    """At the end of a run (finished, failed or interrupted), still holding the lock: drop from the manifest the
    names this run claimed but never wrote (a diverged method's folder, say), so that a folder the user creates
    under such a name later is never taken for ours."""
    from ..defense.output import OutputError, read_manifest, write_manifest

    try:
        ours = read_manifest(args.output)
        kept = {n for n in ours if os.path.lexists(os.path.join(args.output, n))}
        if kept != ours:
            write_manifest(args.output, kept)
    except (OutputError, OSError):
        pass  # the run's own outcome (or error) is what gets reported; the entry stays, as before this run


def all_diverged(results) -> int:
    """Exit code 1 and one line on stderr when every method diverged (nothing was measured), else 0."""
    if results and all(r.get("diverged") for r in results):
        print(
            "muscle-lora: error: every method diverged, so no CACC / ASR was measured (results.json marks them); "
            "lower --lr (or --vanilla-lr), or check --freq-band",
            file=sys.stderr,
        )
        return 1
    return 0
