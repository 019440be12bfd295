"""Defended fine-tuning: the methods on the same model, data and seed, with CACC / ASR at the best dev epoch.

Methods (docs/layer.md, docs/alignment.md):
- "vanilla": full fine-tuning of every weight.
- "lora": plain LoRA (rank 8, alpha 32) on the attention query/value projections; the classification head trains in
  full (the usual PEFT set-up for sequence classification).
- "muscle": the paper's adapter recipe, `MuScleLoRAConfig.for_model(model)` (LoRA in the backbone, multi-scale
  low-rank branches on the head's dense layers), without gradient alignment.
- "muscle-ga": the full method: the same adapters, and every step's gradient aligned with the gradient of a clean
  reference batch (GradientAligner). The reference set is drawn from the clean dev data and removed from it -- for
  every method, so that all of them pick their best epoch on the same dev samples.
- "refonly": the baseline a defense must beat: plain LoRA trained on the reference set alone (the training set
  discarded), for as many optimizer steps as lora and muscle-ga take, its best checkpoint picked on the same dev rows.
- "muscle-screen" (the default of `muscle-lora defend`): screen the training set against the reference set
  (defense/screen.py: over-represented tokens, labels a reference-trained LoRA finds surprising), drop the rows above
  a threshold calibrated on clean dev rows, and train the MuScleLoRA adapters on the rest plus the reference set.
  It writes every row's suspicion (suspects.csv). docs/defense.md has why and what it measured.

Each epoch ends with an evaluation on the clean dev set (and on the poisoned dev set when there is one, to show when a
backdoor is learned); the adapter of the epoch with the best clean dev accuracy is restored and measured on the
held-out test sets, as the paper does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._spec import fraction, integer, non_negative_number, one_of, positive_number
from ..align.gate import GateConfig
from ..align.step import AlignClipStep, build_aligner
from ..nn.spec import AdapterSpec
from .data import DataError, Sample, check_labels
from .metrics import accuracy, attack_success_rate

__all__ = [
    "METHODS",
    "REFERENCE_METHODS",
    "default_method",
    "label_surprise_scores",
    "Settings",
    "reference_size",
    "Splits",
    "split_reference",
    "train_method",
    "run_methods",
    "evaluate",
    "resolve_device",
]

METHODS = ("vanilla", "lora", "refonly", "muscle", "muscle-ga", "muscle-screen")
# the methods that need the clean reference set (drawn from dev by split_reference)
REFERENCE_METHODS = ("refonly", "muscle-ga", "muscle-screen")

_GATE = GateConfig()  # the gate's defaults are GateConfig's (align/gate.py), written there only


@dataclass
class Settings:
    """Everything that defines a run; methods differ only in what defines them (adapters, alignment, vanilla_lr).

    lr: AdamW learning rate of the adapter methods; vanilla_lr: of full fine-tuning (needs a far smaller one).
    ref_size / ref_batch_size / ref_select: the clean reference set of muscle-ga (drawn from dev, removed from it)
        and how it is cut into reference batches; ref_select is "random" or "kmeans" (over hidden states).
        ref_size None (the default): half of the dev set, at most MAX_AUTO_REF_SIZE (`reference_size`).
    min_ref_grad_norm / min_ref_loss / max_raw_ratio / ga_warmup_epochs: the alignment gate (GateConfig, whose
        defaults these are; `gate()` builds it).
    freq_band / mslr_alpha: override the recipe's multi-scale head (None: MuScleLoRAConfig.for_model's choice);
        checked like AdapterSpec's freq_band and alpha, as lora_rank and lora_alpha are.
    screen_epochs / screen_quantile: muscle-screen's screen (defense/screen.py): the reference-set LoRA trains for
        this many passes over the reference set, and a training row is dropped
        when its suspicion exceeds this quantile of the clean dev rows' suspicion.
    sync_timing: on CUDA, synchronise around each step so that step_seconds is the step's own time (serialises
        the GPU; off by default).
    """

    epochs: int = 3
    lr: float = 2e-3
    vanilla_lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    ref_size: int | None = None
    ref_batch_size: int = 32
    ref_select: str = "random"
    min_ref_grad_norm: float = _GATE.min_ref_grad_norm
    min_ref_loss: float = _GATE.min_ref_loss
    max_raw_ratio: float = _GATE.max_raw_ratio
    ga_warmup_epochs: int = _GATE.warmup_epochs
    lora_rank: int = 8
    lora_alpha: float = 32.0
    freq_band: list[float] | None = None
    mslr_alpha: float | None = None
    screen_epochs: int = 10
    screen_quantile: float = 0.9
    sync_timing: bool = False
    device: str = "auto"

    def __post_init__(self):
        for name, low in dict(
            epochs=1,
            batch_size=1,
            eval_batch_size=1,
            max_length=2,
            ref_size=1,
            ref_batch_size=1,
            seed=-(2**63),
            screen_epochs=1,
        ).items():
            if name == "ref_size" and self.ref_size is None:
                continue  # chosen from the dev set's size (reference_size)
            setattr(self, name, integer(low)(name, getattr(self, name)))
        for name in ("lr", "vanilla_lr"):
            setattr(self, name, positive_number(name, getattr(self, name)))
        for name in ("weight_decay", "max_grad_norm"):
            setattr(self, name, non_negative_number(name, getattr(self, name)))
        self.warmup_ratio = fraction("warmup_ratio", self.warmup_ratio)
        self.screen_quantile = fraction("screen_quantile", self.screen_quantile)
        if not 0.0 < self.screen_quantile < 1.0:
            raise ValueError(f"screen_quantile: expected a number strictly between 0 and 1, got {self.screen_quantile}")
        if not isinstance(self.sync_timing, bool):
            raise ValueError(f"sync_timing: expected true or false, got {self.sync_timing!r}")
        self.ref_select = one_of(("random", "kmeans"))("ref_select", self.ref_select)
        # The gate's fields and the adapter overrides go through GateConfig's and AdapterSpec's own checks.
        for name, gate_field in _GATE_FIELDS.items():
            setattr(self, name, GateConfig.check(gate_field, getattr(self, name), name=name))
        self.lora_rank = AdapterSpec.check("inner_rank", self.lora_rank, name="lora_rank")
        self.lora_alpha = AdapterSpec.check("alpha", self.lora_alpha, name="lora_alpha")
        if self.freq_band is not None:
            self.freq_band = list(AdapterSpec.check("freq_band", self.freq_band))
        if self.mslr_alpha is not None:
            self.mslr_alpha = AdapterSpec.check("alpha", self.mslr_alpha, name="mslr_alpha")
        # the scales these give (with the recipe's inner rank 1 and mslr_alpha where not set) must stay finite
        from ..integrations.config import MuScleLoRAConfig

        mslr_alpha = self.mslr_alpha or MuScleLoRAConfig.__dataclass_fields__["mslr_alpha"].default
        AdapterSpec.check_scales(self.freq_band or (1,), 1, mslr_alpha, alpha_name="mslr_alpha")
        AdapterSpec.check_scales((1,), self.lora_rank, self.lora_alpha, alpha_name="lora_alpha")

    def gate(self) -> GateConfig:
        """The alignment gate of this run (before GateConfig.for_epochs fits it to the number of epochs)."""
        return GateConfig(**{gate_field: getattr(self, name) for name, gate_field in _GATE_FIELDS.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings field -> GateConfig field: every gate field, under its own name but warmup_epochs (ga_warmup_epochs here,
# beside the training's own epochs)
_GATE_FIELDS = {
    ("ga_" + f.name if f.name == "warmup_epochs" else f.name): f.name for f in dataclasses.fields(GateConfig)
}


# With alignment on every step the update follows the reference gradient, so clean accuracy follows the reference
# set's size (docs/defense.md has the measurements); half of the dev set keeps the other half to pick the best epoch.
MAX_AUTO_REF_SIZE = 1024


def reference_size(settings: Settings, n_dev: int) -> int:
    """The number of clean reference samples drawn from a dev set of `n_dev`: settings.ref_size, or by default half
    of the dev set, at most MAX_AUTO_REF_SIZE (and at least 1)."""
    if settings.ref_size is not None:
        return settings.ref_size
    return max(1, min(MAX_AUTO_REF_SIZE, n_dev // 2))


@dataclass
class Splits:
    """train may be poisoned; dev and test_clean are clean; test_poison holds triggered non-target samples labelled
    with the target (ASR = accuracy on it); dev_poison (optional) is the same for dev; ref is the clean reference
    set of muscle-ga (filled by split_reference)."""

    train: list[Sample]
    dev: list[Sample]
    test_clean: list[Sample]
    test_poison: list[Sample]
    dev_poison: list[Sample] = field(default_factory=list)
    ref: list[Sample] = field(default_factory=list)


def split_reference(splits: Splits, settings: Settings, *, model=None, tokenizer=None) -> Splits:
    """Draw `ref_size` clean samples from dev as the reference set and remove them from dev.

    ref_select="kmeans" clusters the samples' hidden states (needs `model` and `tokenizer`) and takes the samples
    nearest to the centroids (align/refset.py)."""
    if splits.ref:
        return splits
    ref_size = reference_size(settings, len(splits.dev))
    if len(splits.dev) < ref_size + 2:
        raise DataError(
            f"dev: {len(splits.dev)} clean samples cannot give a reference set of {ref_size} "
            f"and leave a dev set to choose the best epoch on; lower ref_size or add dev data"
        )
    from ..align.refset import hidden_state_features, select_reference

    features = None
    if settings.ref_select == "kmeans":
        if model is None or tokenizer is None:
            raise ValueError("ref_select='kmeans' clusters hidden states: pass model= and tokenizer=")
        device = next(model.parameters()).device
        features = hidden_state_features(
            model,
            _batches(tokenizer, splits.dev, settings.eval_batch_size, settings.max_length, device),
            progress=False,
        )
    idx = select_reference(
        len(splits.dev), ref_size, method=settings.ref_select, features=features, seed=settings.seed
    ).tolist()
    chosen = set(idx)
    ref = [splits.dev[i] for i in sorted(chosen)]
    dev = [s for i, s in enumerate(splits.dev) if i not in chosen]
    return dataclasses.replace(splits, dev=dev, ref=ref)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but no CUDA device is available")
    return device


# ---------------------------------------------------------------------------------------------------------------------
def _batches(
    tokenizer, samples: Sequence[Sample], batch_size: int, max_length: int, device, order: Sequence[int] | None = None
):
    """Tokenized batches with dynamic padding (each batch padded to its own longest sample)."""
    order = range(len(samples)) if order is None else order
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start : start + batch_size]]
        enc = tokenizer(
            [s.text for s in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([s.label for s in chunk], dtype=torch.long)
        yield {k: v.to(device) for k, v in enc.items()}


def _forward_kwargs(model, batch):
    # token_type_ids only where the model takes them (tokenizers of decoder models may still return them)
    if "token_type_ids" in batch and getattr(model.config, "type_vocab_size", 0) in (0, None):
        batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


@torch.no_grad()
def predict(
    model,
    tokenizer,
    samples: Sequence[Sample],
    settings: Settings,
    device,
    *,
    desc: str = "eval",
    progress: bool = True,
) -> list[int]:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    preds = []
    n_batches = math.ceil(len(samples) / settings.eval_batch_size)
    for batch in tqdm(
        _batches(tokenizer, samples, settings.eval_batch_size, settings.max_length, device),
        total=n_batches,
        desc=desc,
        leave=False,
        disable=not progress,
    ):
        batch = _forward_kwargs(model, batch)
        batch.pop("labels")
        preds.extend(model(**batch).logits.argmax(-1).tolist())
    model.train(was_training)
    return preds


@torch.no_grad()
def label_surprise_scores(model, tokenizer, samples: Sequence[Sample], settings: Settings, device) -> list[float]:
    """Each sample's cross-entropy of its own label under `model` (eval mode): how much the label surprises it."""
    was_training = model.training
    model.eval()
    out = []
    for batch in _batches(tokenizer, samples, settings.eval_batch_size, settings.max_length, device):
        batch = _forward_kwargs(model, batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        out.extend(torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist())
    model.train(was_training)
    return out


def evaluate(
    model,
    tokenizer,
    samples: Sequence[Sample],
    settings: Settings,
    device,
    *,
    poisoned: bool = False,
    target_label: int | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> float:
    """Clean accuracy, or (poisoned=True) the attack success rate on a triggered set."""
    if not samples:
        return float("nan")
    preds = predict(model, tokenizer, samples, settings, device, desc=desc, progress=progress)
    if poisoned:
        target = samples[0].label if target_label is None else target_label
        return attack_success_rate(preds, target)
    return accuracy(preds, [s.label for s in samples])


def _prepare(model: nn.Module, method: str, settings: Settings) -> nn.Module:
    """Put the method's adapters in (or unfreeze everything for vanilla)."""
    if method == "vanilla":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from ..integrations.apply import apply_muscle_lora
    from ..integrations.config import MuScleLoRAConfig

    overrides = dict(lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha)
    if method in ("lora", "refonly"):
        recipe = MuScleLoRAConfig.for_model(model)
        # Plain LoRA: no multi-scale head; the head's modules train in full instead.
        config = MuScleLoRAConfig.for_model(
            model, mslr_targets=[], trainable=list(recipe.modules_to_save), score_head_hidden=None, **overrides
        )
    else:
        if settings.freq_band is not None:
            overrides["freq_band"] = list(settings.freq_band)
        if settings.mslr_alpha is not None:
            overrides["mslr_alpha"] = float(settings.mslr_alpha)
        config = MuScleLoRAConfig.for_model(model, **overrides)
    return apply_muscle_lora(model, config)


def _lr_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(round(total_steps * warmup_ratio))

    def f(step: int) -> float:  # linear warm-up, then linear decay to zero (the transformers default)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return f


def _steps_per_epoch(rows: int, settings: Settings) -> int:
    return math.ceil(rows / settings.batch_size)


def _fit(
    model,
    tokenizer,
    rows: Sequence[Sample],
    settings: Settings,
    device,
    *,
    method: str,
    total_steps: int,
    checkpoints: int,
    splits: Splits,
    lr: float,
    aligner_factory=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable | None = None,
) -> dict:
    """Train `model`'s trainable tensors on `rows` for `total_steps` optimizer steps (shuffled passes, the last one
    cut short), evaluating on the dev sets at `checkpoints` evenly spaced steps (epoch ends when the steps are whole
    epochs) and keeping the best checkpoint's tensors. Returns history, best (acc, epoch, state), step_times."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{method}: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, settings.warmup_ratio))
    aligner = aligner_factory(params) if aligner_factory is not None else None
    update = AlignClipStep(
        params, aligner=aligner, max_grad_norm=settings.max_grad_norm, optimizer=opt, scheduler=sched
    )
    ends = sorted({max(1, round(total_steps * (c + 1) / checkpoints)) for c in range(checkpoints)})
    per_pass = _steps_per_epoch(len(rows), settings)
    gen = torch.Generator().manual_seed(settings.seed)
    history, step_times = [], []
    best = dict(acc=-1.0, epoch=-1, state=None)
    sync = device.type == "cuda" and settings.sync_timing
    if on_step is not None:
        on_step(0, model, method=method)
    step = 0
    watch = DivergenceWatch()
    bar = tqdm(total=total_steps, desc=method, leave=False, disable=not progress)
    losses, branches = [], []
    while step < total_steps:
        order = torch.randperm(len(rows), generator=gen).tolist()
        for batch in _batches(tokenizer, rows, settings.batch_size, settings.max_length, device, order):
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(**_forward_kwargs(model, batch)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            done = update(model, step // per_pass)  # align (muscle-ga), clip, optimizer and scheduler step
            if aligner is not None:
                branches.append(done.align.branch)
            if sync:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step(step, model, method=method)
            if aligner is None:
                diverged = watch(step, losses[-1])
            else:  # a step that aligned nothing ("skipped") has no reference loss
                ref_loss = None if done.align.branch == "skipped" else done.align.ref_loss
                diverged = watch(step, losses[-1], aligned=True, ref_loss=ref_loss)
            if (
                diverged is None
                and step == ends[len(history)]
                and not all(bool(torch.isfinite(p).all()) for p in params)
            ):  # the last update broke them
                diverged = f"non-finite weights after step {step}"
            if diverged:  # every further step and the evaluations would be of a broken model
                bar.close()
                log(f"  {method} diverged: {diverged}")
                return dict(diverged=diverged, history=history, step_times=step_times, params=params)
            if step == ends[len(history)]:
                record = _checkpoint(
                    model, tokenizer, splits, settings, device, len(history) + 1, losses, branches, progress
                )
                history.append(record)
                log(
                    f"  {method} {'epoch' if total_steps == per_pass * len(ends) else 'checkpoint'} "
                    f"{record['epoch']}/{len(ends)}: loss {record['train_loss']:.4f}  dev acc {record['dev_acc']:.4f}"
                    + (f"  dev ASR {record['dev_asr']:.4f}" if splits.dev_poison else "")
                    + (f"  aligned {record['aligned_fraction']:.0%}" if aligner is not None else "")
                )
                if record["dev_acc"] > best["acc"]:
                    best = dict(
                        acc=record["dev_acc"],
                        epoch=record["epoch"],
                        state={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                    )
                losses, branches = [], []
            if step >= total_steps:
                break
    bar.close()
    with torch.no_grad():  # back to the best checkpoint's weights (only trainable tensors ever change)
        named = dict(model.named_parameters())
        for n, v in best["state"].items():
            named[n].copy_(v)
    return dict(diverged=None, history=history, best=best, step_times=step_times, params=params)


def _checkpoint(model, tokenizer, splits, settings, device, index, losses, branches, progress) -> dict:
    dev_acc = evaluate(model, tokenizer, splits.dev, settings, device, desc="dev", progress=progress)
    dev_asr = (
        evaluate(
            model, tokenizer, splits.dev_poison, settings, device, poisoned=True, desc="dev-poison", progress=progress
        )
        if splits.dev_poison
        else float("nan")
    )
    record = dict(
        epoch=index, train_loss=statistics.fmean(losses) if losses else float("nan"), dev_acc=dev_acc, dev_asr=dev_asr
    )
    if branches:  # the share of steps whose gradient was replaced by its projection (the rest: blended or raw)
        record["aligned_fraction"] = branches.count("replace") / len(branches)
        record["blended_fraction"] = branches.count("blend") / len(branches)
    return record


def _screen(
    model_factory, tokenizer, splits: Splits, settings: Settings, device, *, progress: bool, log: Callable[[str], None]
):
    """muscle-screen's first stage: a LoRA fitted to the reference set alone, then every training row scored
    against the reference set (defense/screen.py). Returns (Screen or None when the probe diverged, the probe's _fit
    record, seconds)."""
    from .screen import screen_rows, token_scores

    t0 = time.perf_counter()
    calib = splits.dev  # clean rows that neither the reference model nor the token counts have seen
    rows = (splits.train, splits.ref, calib)
    lex_train, lex_calib = token_scores(
        *([s.text for s in part] for part in rows), labels=tuple([s.label for s in part] for part in rows)
    )
    probe = _prepare(model_factory(), "lora", settings).to(device)
    probe.train()
    ref_steps = _steps_per_epoch(len(splits.ref), settings)
    steps = settings.screen_epochs * ref_steps  # not cut to the training set's size: a small set needs a good probe
    fitted = _fit(
        probe,
        tokenizer,
        splits.ref,
        settings,
        device,
        method="screen",
        total_steps=steps,
        checkpoints=1,
        splits=dataclasses.replace(splits, dev_poison=[]),
        lr=settings.lr,
        progress=progress,
        log=log,
    )
    if fitted["diverged"]:
        return None, fitted, time.perf_counter() - t0
    surprise_train = label_surprise_scores(probe, tokenizer, splits.train, settings, device)
    surprise_calib = label_surprise_scores(probe, tokenizer, calib, settings, device)
    probe.to("cpu")
    del probe
    screen = screen_rows(
        dict(tokens=lex_train, label=surprise_train),
        dict(tokens=lex_calib, label=surprise_calib),
        quantile=settings.screen_quantile,
    )
    log(
        f"  screen: {sum(screen.flagged)} of {len(screen.flagged)} training rows flagged "
        f"(threshold {screen.threshold:.2f}, the {settings.screen_quantile:.0%} point of {len(calib)} clean dev rows)"
    )
    return screen, fitted, time.perf_counter() - t0


def train_method(
    method: str,
    model_factory: Callable[[], nn.Module],
    tokenizer,
    splits: Splits,
    settings: Settings,
    *,
    output_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable | None = None,
) -> dict:
    """Fine-tune a fresh model from `model_factory()` with `method`; return its result record.

    The record: method, cacc, asr (at the best dev checkpoint), best_epoch, train_seconds, step_seconds (median time
    of one optimizer step), steps, history (per checkpoint: dev accuracy, dev ASR, train loss, share of aligned
    steps), settings; muscle-screen adds `screen` (rows flagged, threshold, screening steps and seconds) and
    `suspects` (each training row's suspicion score, in the training set's order) and `suspect_parts` (each part's
    tail score, by part name, in the same order).
    With `output_dir`, the adapter (or, for vanilla, the full model) goes to output_dir/<method>/ (muscle-screen also
    writes output_dir/suspects.csv).
    `on_step(step, model, method=method)` is called before the first step (step 0) and after every optimizer step
    (e.g. analysis.FrequencyRecorder); its time is not counted in train_seconds.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method in REFERENCE_METHODS and not splits.ref:
        raise ValueError(f"{method} needs a clean reference set: call split_reference(splits, settings) first")
    device = resolve_device(settings.device)
    # Same seed for every method: the same fresh head, the same batch order.
    torch.manual_seed(settings.seed)
    extra = {}
    rows = splits.train
    epoch_steps = _steps_per_epoch(len(splits.train), settings)
    total_steps, checkpoints = epoch_steps * settings.epochs, settings.epochs
    screen_seconds = 0.0
    if method == "muscle-screen":
        screen, probe, screen_seconds = _screen(
            model_factory, tokenizer, splits, settings, device, progress=progress, log=log
        )
        if screen is None:
            return _diverged_record(
                method,
                "screen: " + probe["diverged"],
                [],
                probe["step_times"],
                settings.lr,
                probe["params"],
                device,
                settings,
            )
        screen_steps = len(probe["step_times"])
        rows = [splits.train[i] for i in screen.kept] + list(splits.ref)
        total_steps = _steps_per_epoch(len(rows), settings) * settings.epochs
        extra = dict(
            screen=dict(screen.summary(), steps=screen_steps, seconds=screen_seconds),
            suspects=[round(s, 4) for s in screen.scores],
            suspect_parts={name: [round(v, 4) for v in part] for name, part in screen.parts.items()},
        )
        if output_dir is not None:
            from .screen import write_suspects

            os.makedirs(output_dir, exist_ok=True)
            write_suspects(os.path.join(output_dir, "suspects.csv"), screen)
        torch.manual_seed(settings.seed)  # the trained model's fresh head as for every other method
    elif method == "refonly":
        rows = splits.ref  # what a user gets by discarding the training set: as many steps, on the reference set
    model = model_factory()
    num_labels = int(getattr(model.config, "num_labels", 2))
    for name in ("train", "dev", "test_clean", "test_poison"):
        check_labels(getattr(splits, name), num_labels, name)
    model = _prepare(model, method, settings).to(device)
    model.train()
    lr = settings.vanilla_lr if method == "vanilla" else settings.lr
    aligner_factory = None
    if method == "muscle-ga":
        ref_batches = list(_batches(tokenizer, splits.ref, settings.ref_batch_size, settings.max_length, device))

        def aligner_factory(params):
            return build_aligner(
                params,
                ref_batches,
                lambda m, b: m(**_forward_kwargs(m, b)).loss,
                epochs=settings.epochs,
                gate=settings.gate(),
                one_batch=True,
            )

    fitted = _fit(
        model,
        tokenizer,
        rows,
        settings,
        device,
        method=method,
        total_steps=total_steps,
        checkpoints=checkpoints,
        splits=splits,
        lr=lr,
        aligner_factory=aligner_factory,
        progress=progress,
        log=log,
        on_step=on_step,
    )
    step_times = fitted["step_times"]
    if fitted["diverged"]:
        return _diverged_record(
            method, fitted["diverged"], fitted["history"], step_times, lr, fitted["params"], device, settings
        )
    target = splits.test_poison[0].label if splits.test_poison else None
    cacc = evaluate(model, tokenizer, splits.test_clean, settings, device, desc="test-clean", progress=progress)
    asr = evaluate(
        model,
        tokenizer,
        splits.test_poison,
        settings,
        device,
        poisoned=True,
        target_label=target,
        desc="test-poison",
        progress=progress,
    )
    result = dict(
        method=method,
        cacc=cacc,
        asr=asr,
        best_epoch=fitted["best"]["epoch"],
        train_seconds=sum(step_times) + screen_seconds,
        step_seconds=statistics.median(step_times),
        steps=len(step_times) + extra.get("screen", {}).get("steps", 0),
        train_rows=len(rows),
        lr=lr,
        trainable_parameters=sum(p.numel() for p in fitted["params"]),
        device=str(device),
        num_labels=num_labels,
        history=fitted["history"],
        settings=settings.to_dict(),
        **extra,
    )
    if output_dir is not None:
        result["saved_to"] = _save(model, method, output_dir)
    model.to("cpu")
    return result


# A step's loss this many times its start (at least 1) marks a diverged run, as does a non-finite loss: the numbers
# measured on such a model would be those of a broken classifier, not of a defense.
DIVERGENCE_FACTOR = 10.0


def _divergence(loss: float, first: float, step: int, name: str = "loss") -> str | None:
    """Why the run diverged at `step` (a loss of nan/inf, or far above its start), or None."""
    if not math.isfinite(loss):
        return f"{name} {loss} at step {step}"
    if math.isfinite(first) and loss > DIVERGENCE_FACTOR * max(first, 1.0):
        return f"{name} {loss:.4g} at step {step}, more than {DIVERGENCE_FACTOR:g} x its start {first:.4g}"
    return None


class DivergenceWatch:
    """The divergence rule over a run, on the loss the run follows.

    A plain run descends its training loss, so that loss is watched. An aligned run (muscle-ga) moves along the
    reference gradient: it refuses to fit the rows that disagree with the reference set, and its model grows
    confident, so the training loss of those rows may rise far above its start while the classifier is sound.
    There the reference loss is watched for growth; the training loss only has to stay finite (a NaN training
    gradient would reach the weights)."""

    def __init__(self):
        self.first: dict[str, float] = {}

    def __call__(self, step: int, loss: float, aligned: bool = False, ref_loss: float | None = None) -> str | None:
        """Why the run diverged at `step`, or None. ref_loss: None at an aligned step that had no reference batch."""
        if not aligned:
            return self._check("loss", loss, step)
        if not math.isfinite(loss):
            return f"loss {loss} at step {step}"
        return None if ref_loss is None else self._check("reference loss", ref_loss, step)

    def _check(self, name: str, value: float, step: int) -> str | None:
        return _divergence(value, self.first.setdefault(name, value), step, name)


def _diverged_record(method, reason, history, step_times, lr, params, device, settings) -> dict:
    """The record of a run stopped by divergence: marked, CACC/ASR not measured (NaN; null in results.json)."""
    return dict(
        method=method,
        diverged=True,
        diverged_reason=reason,
        cacc=float("nan"),
        asr=float("nan"),
        best_epoch=None,
        train_seconds=sum(step_times),
        step_seconds=statistics.median(step_times),
        steps=len(step_times),
        lr=lr,
        trainable_parameters=sum(p.numel() for p in params),
        device=str(device),
        history=history,
        settings=settings.to_dict(),
    )


def _save(model, method: str, output_dir: str) -> str:
    path = os.path.join(output_dir, method)
    if method == "vanilla":
        model.save_pretrained(path)
    else:
        from ..integrations.adapters import save_adapter

        save_adapter(model, path)
    return path


def run_methods(
    methods: Sequence[str],
    model_factory: Callable[[], nn.Module],
    tokenizer,
    splits: Splits,
    settings: Settings,
    *,
    output_dir: str | None = None,
    save_models: bool = True,
    save_vanilla: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    extra: dict | None = None,
    on_step: Callable | None = None,
) -> list[dict]:
    """Run every method on the same data and seed; write output_dir/results.json (and the plot) as it goes.

    save_models: save each adapter to output_dir/<method>/; save_vanilla: also the fully fine-tuned model (the size
    of the whole model). on_step: passed to every train_method."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: expected some of {METHODS}, got {list(methods)!r}")
    if settings.ref_select == "kmeans" and not splits.ref:
        # k-means over the pretrained model's hidden states (before any fine-tuning)
        torch.manual_seed(settings.seed)
        probe = model_factory().to(resolve_device(settings.device))
        splits = split_reference(splits, settings, model=probe, tokenizer=tokenizer)
        del probe
    else:
        splits = split_reference(splits, settings)
    results = []
    plot = output_dir is not None
    for method in methods:
        log(f"== {method}")
        results.append(
            train_method(
                method,
                model_factory,
                tokenizer,
                splits,
                settings,
                output_dir=output_dir if save_models and (save_vanilla or method != "vanilla") else None,
                progress=progress,
                log=log,
                on_step=on_step,
            )
        )
        if output_dir is not None:  # after each method: an interrupted run keeps what it finished
            write_results(output_dir, results, extra=extra, complete=False)
            plot = plot and _write_plot(results, output_dir)
    if output_dir is not None:
        write_results(output_dir, results, extra=extra, complete=True)
    return results


def _write_plot(results: list[dict], output_dir: str) -> bool:
    """results.png; without matplotlib one warning and False (the caller stops trying), never an error."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn(
            "matplotlib is not installed: results.png is skipped (pip install matplotlib); "
            "results.json holds every number",
            stacklevel=3,
        )
        return False
    from .plot import plot_results

    plot_results(results, os.path.join(output_dir, "results.png"))
    return True


def write_results(output_dir: str, results: list[dict], *, extra: dict | None = None, complete: bool = True) -> str:
    """output_dir/results.json: {"complete": bool, "results": [one record per method]}, strict JSON (NaN -> null).

    complete is False while a run is still going (or was interrupted). The file is replaced atomically (written to
    a temporary file, then os.replace): a reader never sees half a file, and a planted results.json symlink is
    replaced, its target left alone."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    payload = copy.deepcopy(results)
    if extra:
        for r in payload:
            r["settings"].update(extra)
    from .output import json_safe, replace_atomically

    text = json.dumps({"complete": bool(complete), "results": json_safe(payload)}, indent=2, allow_nan=False)
    replace_atomically(path, lambda f: f.write(text.encode("utf-8")))
    return path


# The paper's own training recipe (its BERT/RoBERTa settings), one flag away from the defaults: `--recipe paper`.
PAPER_RECIPE = dict(
    ref_size=96, ref_batch_size=16, min_ref_loss=0.4, max_raw_ratio=0.1, ga_warmup_epochs=1, freq_band=None
)
RECIPES = ("default", "paper")


def default_method(recipe: str) -> str:
    """`muscle-lora defend`'s method when none is named: muscle-screen, or the paper's muscle-ga with its recipe."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
    return "muscle-ga" if recipe == "paper" else "muscle-screen"


def recipe_settings(name: str) -> dict:
    """The Settings fields a named recipe sets: "default" (this package's measured defaults) or "paper"."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {RECIPES}, got {name!r}")
    return dict(PAPER_RECIPE) if name == "paper" else {}
