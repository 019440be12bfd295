"""Record the frequency analysis during training: a hook that, every `every` steps, filters the model's outputs on
fixed probe sets and appends tidy rows to a CSV file (docs/frequency.md).

    probes = {"clean": Probe.from_texts(tok, clean_texts, clean_labels),
              "poisoned": Probe.from_texts(tok, poisoned_texts, poisoned_labels)}
    rec = FrequencyRecorder("frequency.csv", probes, every=20)
    for step, batch in enumerate(loader, 1):
        ...; opt.step()
        rec(step, model, method="lora")          # records when step % every == 0
    # or: Trainer(..., callbacks=[FrequencyCallback(rec)])   (analysis/callback.py)

What is measured, per record and probe set (the paper follows Xu et al.'s frequency principle):
- x: the representation the filter is defined over, by default the mean input embedding of each sample (the
  embedding lookup averaged over its non-padding tokens). For adapter methods it does not change during training,
  so the filter is fixed and only the outputs move.
- f: the model's output probabilities (softmax of the logits) on the probe samples; and the labels (one-hot) as the
  target function.
- For every sigma: low = ||K f||, high = ||f - K f||, ratio = low / high; low_centered = ||K f - mean f|| and
  ratio_centered = low_centered / high, the same without the constant part (which K keeps whole and which dominates
  the ratio of probabilities); and for the outputs also the paper's
  relative errors against the labels y per band, err_low = ||K(f - y)|| / ||K y|| and
  err_high = ||(f - y) - K(f - y)|| / ||y - K y|| (nan where the band of y is empty).
Sigmas are multiples of the median pairwise distance of all probe inputs, measured once at the first record (so that
every later record, and every method recorded by the same recorder, uses the same absolute widths).

Rows (one per step, method, subset, target, sigma): step, method, subset, target ("output" or "labels"), sigma,
sigma_rel, n, low, high, ratio, low_centered, ratio_centered, err_low, err_high. Subsets: each probe set, and "all" (their union).
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .frequency import low_frequency_part

__all__ = [
    "Probe",
    "FrequencyRecorder",
    "mean_input_embedding",
    "COLUMNS",
    "DEFAULT_SIGMAS_REL",
    "DEFAULT_EVERY",
    "read_rows",
]

COLUMNS = (
    "step",
    "method",
    "subset",
    "target",
    "sigma",
    "sigma_rel",
    "n",
    "low",
    "high",
    "ratio",
    "low_centered",
    "ratio_centered",
    "err_low",
    "err_high",
)
# narrow to wide, in units of the median pairwise distance of the probe inputs
DEFAULT_SIGMAS_REL = (0.02, 0.05, 0.1, 0.2, 0.5)
# Every 25 optimizer steps: with 2 probe sets of 64 samples, a record costs about one training step of batch 32
# on the CPU (forward only, in eval mode), i.e. a few percent of training time (benchmarks/RESULTS.md).
DEFAULT_EVERY = 25


@dataclass
class Probe:
    """A fixed probe set: tokenized batches (CPU tensors; moved to the model's device when recorded) and labels."""

    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor  # [n] long

    @classmethod
    def from_texts(
        cls, tokenizer, texts: Sequence[str], labels: Sequence[int], *, batch_size: int = 128, max_length: int = 64
    ) -> Probe:
        texts, labels = list(texts), [int(v) for v in labels]
        if len(texts) != len(labels):
            raise ValueError(f"labels: expected one label per text ({len(texts)}), got {len(labels)}")
        if not texts:
            raise ValueError("texts: a probe set needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        batches = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batches.append(dict(enc))
        return cls(batches=batches, labels=torch.tensor(labels, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.labels.numel())


def mean_input_embedding(model, batch: Mapping[str, torch.Tensor], outputs=None) -> torch.Tensor:
    """The mean of the input embeddings over each sample's non-padding tokens: [batch, hidden] fp32."""
    emb = model.get_input_embeddings()(batch["input_ids"]).float()
    mask = batch.get("attention_mask")
    if mask is None:
        return emb.mean(1)
    mask = mask.to(emb.dtype)[..., None]
    return (emb * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _model_inputs(model, batch):
    # token_type_ids only where the model takes them (tokenizers of decoder models may still return them)
    config = getattr(model, "config", None)
    if "token_type_ids" in batch and getattr(config, "type_vocab_size", 0) in (0, None):
        batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


class FrequencyRecorder:
    """The training hook: `recorder(step, model, method=...)` records when step % every == 0; `record` always does.

    path: the CSV file rows are appended to (written with a header when new or empty).
    probes: name -> Probe (e.g. "clean", "poisoned"); the name "all" is reserved for their union.
    sigmas_rel: filter widths relative to the median probe distance; or `sigmas` for absolute widths.
    representation(model, batch, outputs) -> [batch, d]: x of the filter (default: mean_input_embedding).
    backend: of low_frequency_part ("auto": the Triton kernel on CUDA, the chunked torch path on the CPU).
    seconds: the total time spent recording (to weigh against the training time).
    """

    def __init__(
        self,
        path: str,
        probes: Mapping[str, Probe],
        *,
        every: int = DEFAULT_EVERY,
        sigmas_rel: Sequence[float] | None = DEFAULT_SIGMAS_REL,
        sigmas: Sequence[float] | None = None,
        representation: Callable = mean_input_embedding,
        backend: str = "auto",
        num_labels: int | None = None,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive number of steps, got {every!r}")
        if not probes:
            raise ValueError("probes: expected at least one probe set (name -> Probe)")
        if "all" in probes:
            raise ValueError("probes: the name 'all' is reserved for the union of the probe sets")
        for name, p in probes.items():
            if not isinstance(p, Probe):
                raise TypeError(f"probes[{name!r}]: expected a Probe, got {type(p).__name__}")
        if (sigmas is None) == (sigmas_rel is None):
            raise ValueError(
                "sigmas / sigmas_rel: give exactly one (absolute widths or multiples of the median probe distance)"
            )
        widths = list(sigmas if sigmas is not None else sigmas_rel)
        if not widths or any(not isinstance(s, (int, float)) or not 0 < s < math.inf for s in widths):
            name = "sigmas" if sigmas is not None else "sigmas_rel"
            raise ValueError(f"{name}: expected positive finite widths, got {widths!r}")
        self.path = path
        self.probes = dict(probes)
        self.every = every
        self._rel = None if sigmas_rel is None else [float(s) for s in sigmas_rel]
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas]
        self.scale: float | None = None  # the median probe distance, once measured
        self.representation = representation
        self.backend = backend
        self.num_labels = num_labels
        self.seconds = 0.0
        self.records = 0

    def __call__(self, step: int, model, method: str | None = None) -> None:
        if step % self.every == 0:
            self.record(step, model, method=method)

    @torch.no_grad()
    def record(self, step: int, model, method: str | None = None) -> list[dict]:
        """Filter the model's outputs on every probe set now; append and return the rows."""
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            xs, fs, ys = {}, {}, {}
            device = next(model.parameters()).device
            for name, probe in self.probes.items():
                x_parts, f_parts = [], []
                for batch in probe.batches:
                    batch = _model_inputs(model, {k: v.to(device) for k, v in batch.items()})
                    out = model(**batch)
                    x_parts.append(self.representation(model, batch, out).float())
                    f_parts.append(torch.softmax(out.logits.float(), dim=-1))
                xs[name], fs[name] = torch.cat(x_parts), torch.cat(f_parts)
                c = self.num_labels or fs[name].shape[1]
                ys[name] = torch.nn.functional.one_hot(probe.labels.to(device), c).float()
        finally:
            model.train(was_training)
        if len(self.probes) > 1:
            xs["all"], fs["all"], ys["all"] = (torch.cat([d[n] for n in self.probes]) for d in (xs, fs, ys))
        sigmas, rel = self._widths(xs)
        rows = []
        for subset in xs:
            x, f, y = xs[subset], fs[subset], ys[subset]
            c = f.shape[1]
            low = low_frequency_part(x, torch.cat([f, y], 1), sigmas, backend=self.backend)  # one pass for both
            kf, ky = low[..., :c], low[..., c:]
            for target, v, kv in (("output", f, kf), ("labels", y, ky)):
                lo = kv.flatten(1).norm(dim=1)
                hi = (v[None] - kv).flatten(1).norm(dim=1)
                # K keeps constants (rows sum to 1), so the mean of f is all "low" and, for probabilities near
                # 0.5, swamps the ratio; ||K f - mean f|| = ||K (f - mean f)|| is the low part of the variation
                lo_c = (kv - v.mean(0)).flatten(1).norm(dim=1)
                flat = max(1e-5 * v.norm().item(), 1e-30)  # a constant v (the poisoned labels): 0 / 0 -> nan
                if target == "output":  # the paper's relative errors per band, against the labels
                    y_lo = ky.flatten(1).norm(dim=1)
                    y_hi = (y[None] - ky).flatten(1).norm(dim=1)
                    # a band of y below rounding level (e.g. constant labels have no high part): nan, not 1e7
                    tiny = 1e-5 * y.norm()
                    e_lo = torch.where(y_lo > tiny, (kf - ky).flatten(1).norm(dim=1) / y_lo, math.nan)
                    e_hi = torch.where(y_hi > tiny, ((f - y)[None] - (kf - ky)).flatten(1).norm(dim=1) / y_hi, math.nan)
                else:
                    e_lo = e_hi = torch.full_like(lo, math.nan)
                for i, s in enumerate(sigmas):
                    lo_i, hi_i = lo[i].item(), hi[i].item()
                    rows.append(
                        dict(
                            step=int(step),
                            method=method or "",
                            subset=subset,
                            target=target,
                            sigma=s,
                            sigma_rel=rel[i],
                            n=int(x.shape[0]),
                            low=lo_i,
                            high=hi_i,
                            ratio=lo_i / hi_i if hi_i > 0 else math.inf,
                            low_centered=lo_c[i].item(),
                            ratio_centered=(
                                math.nan
                                if max(hi_i, lo_c[i].item()) <= flat
                                else lo_c[i].item() / hi_i
                                if hi_i > 0
                                else math.inf
                            ),
                            err_low=_finite_or_nan(e_lo[i].item()),
                            err_high=_finite_or_nan(e_hi[i].item()),
                        )
                    )
        self._append(rows)
        self.records += 1
        self.seconds += time.perf_counter() - t0
        return rows

    def _widths(self, xs):
        if self.sigmas is not None and self._rel is None:
            return self.sigmas, [math.nan] * len(self.sigmas)
        if self.scale is None:
            x = xs["all"] if "all" in xs else next(iter(xs.values()))
            d = torch.pdist(x.double()) if x.shape[0] > 1 else x.new_ones(1).double()
            self.scale = float(d.median().item()) or 1.0  # all probes identical: any width gives the same filter
            self.sigmas = [r * self.scale for r in self._rel]
        return self.sigmas, self._rel

    def _append(self, rows):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)


def _finite_or_nan(v: float) -> float:
    return v if math.isfinite(v) else math.nan


def read_rows(path: str) -> list[dict]:
    """The rows of a recorder's CSV file, numbers parsed (inf and nan as floats)."""
    rows = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            missing = [c for c in COLUMNS if c not in row or row[c] is None]
            if missing:
                raise ValueError(f"{path}: row {i} lacks the columns {missing} (not a FrequencyRecorder file?)")
            try:
                parsed = dict(
                    row, step=int(row["step"]), n=int(row["n"]), **{k: float(row[k]) for k in COLUMNS[4:] if k != "n"}
                )
            except ValueError as e:
                raise ValueError(f"{path}: row {i}: {e}") from None
            rows.append(parsed)
    return rows
