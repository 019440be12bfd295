"""Screening a training set against the clean reference set: which rows look poisoned (docs/defense.md).

A backdoor needs many training rows that share something the clean data does not have, and, for a dirty-label attack,
rows whose label disagrees with their meaning. Both show when the training set is compared with a small set of rows
known to be clean (the reference set the user already gives MuScleLoRA):

- **over-represented tokens** (`token_scores`): a word, a word pair, a first word or a punctuation pattern that the
  training set uses far more often than the reference set predicts (a BadNets word, an AddSent sentence, a
  paraphrase template's opening "when you ...", a generator's spacing of commas). Each token's count in the reference
  set is tested against the count the training set predicts for a set of that size (a signed likelihood-ratio
  statistic, Poisson); a row scores the largest value of its tokens. A row's own tokens are left out of the training
  counts, so a word used once is never evidence. Works for clean-label attacks too: it never looks at the label.
- **label surprise** (`label_surprise`): the cross-entropy of the row's label under a model trained on the reference
  set alone. A relabelled row (its text still says its original class) surprises a clean model; a paraphrase
  trigger that leaves no lexical trace is caught here.

Each score is put on one scale by calibrating it on clean rows the scorer never saw (the dev rows held out for
picking the best epoch): -log10 of its empirical tail probability among those rows (`tail_scores`). A row's
suspicion is the larger of its two tail scores; it is flagged when that exceeds the `quantile` of the same value over
the calibration rows, so about 1 - quantile of the clean training rows are flagged with the poisoned ones, whatever
the poison rate.
Nothing here reads a poison flag.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["FEATURES", "Screen", "token_scores", "robust_z", "tail_scores", "screen_rows", "write_suspects"]

_WORD = re.compile(r"\w+")
_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


FEATURES = ("words", "pairs", "first", "marks")


def _tokens(text: str, features: Sequence[str] = FEATURES) -> set:
    """The features a row is screened on, as a set (a feature counts once per row); `features` picks the kinds:

    - `words`: its words (a BadNets word, an AddSent sentence's words);
    - `pairs`: its word pairs ("when you": a paraphrase template's function words, common alone, rare together);
    - `first`: its first word, marked ("^when": a syntactic template moves a clause to the front of every row it
      writes);
    - `marks`: each pair of adjacent marks or of a mark and a word ("p:, you", "p:' re"): how a generator writes
      punctuation and contractions, which people do not write the same way.
    """
    low = text.lower()
    words = _WORD.findall(low)
    feats = set(words) if "words" in features else set()
    if "pairs" in features:
        feats.update(f"{a} {b}" for a, b in zip(words, words[1:]))
    if "first" in features and words:
        feats.add("^" + words[0])
    if "marks" in features:
        pieces = _WORD_OR_MARK.findall(low)
        feats.update(
            f"p:{a} {b}" for a, b in zip(pieces, pieces[1:]) if not (_WORD.fullmatch(a) and _WORD.fullmatch(b))
        )
    return feats


def _signed_root_g(observed: int, expected: float) -> float:
    """sqrt of the Poisson likelihood-ratio statistic G, positive when `observed` falls short of `expected`."""
    if expected <= 0.0:
        return 0.0
    g = 2.0 * ((observed * math.log(observed / expected) if observed > 0 else 0.0) - (observed - expected))
    return math.copysign(math.sqrt(max(g, 0.0)), expected - observed)


def token_scores(
    train_texts: Sequence[str],
    ref_texts: Sequence[str],
    other_texts: Sequence[str] = (),
    *,
    features: Sequence[str] = FEATURES,
    labels: tuple | None = None,
) -> tuple:
    """(scores of the training rows, scores of `other_texts`): each row's largest over-representation statistic.

    A token in n of the N training rows predicts (n / N) * R rows of the R reference rows; the statistic says how
    far the reference count falls short of that. For a training row its own occurrence is left out (n - 1 of N - 1);
    `other_texts` (calibration rows, not in the training set) are scored against the full counts. `features`: the
    kinds of feature scored (`FEATURES`, all by default; fewer for an ablation).

    `labels`: (training labels, reference labels, other labels). Each feature is then also counted together with its
    row's label, so a feature that is common in both classes but over-represented in one (a style written into rows
    relabelled to the target) stands out; a clean-label trigger is still caught by the feature alone."""
    unknown = sorted(set(features) - set(FEATURES))
    if unknown or not features:
        raise ValueError(f"features: expected some of {', '.join(FEATURES)}, got {list(features)!r}")
    if not train_texts or not ref_texts:
        raise ValueError(
            f"token_scores: needs training rows and reference rows, got {len(train_texts)} and {len(ref_texts)}"
        )
    texts = (train_texts, ref_texts, other_texts)
    if labels is not None and [len(x) for x in labels] != [len(x) for x in texts]:
        raise ValueError(
            f"labels: expected {', '.join(str(len(x)) for x in texts)} labels (training, reference, other rows), "
            f"got {', '.join(str(len(x)) for x in labels)}"
        )

    def sets(which: int) -> list:
        out = [_tokens(t, features) for t in texts[which]]
        if labels is not None:
            out = [s | {f"{y}|{t}" for t in s} for s, y in zip(out, labels[which])]
        return out

    train_sets = sets(0)
    n_train, n_ref = len(train_sets), len(ref_texts)
    in_train = Counter(t for s in train_sets for t in s)
    in_ref = Counter(t for s in sets(1) for t in s)

    def row(tokens, own: int) -> float:
        best = 0.0
        rows = n_train - own
        if rows <= 0:
            return 0.0
        for t in tokens:
            expected = (in_train[t] - own) / rows * n_ref
            best = max(best, _signed_root_g(in_ref[t], expected))
        return best

    return ([row(s, 1) for s in train_sets], [row(s, 0) for s in sets(2)])


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def robust_z(values: Sequence[float], calibration: Sequence[float]) -> list[float]:
    """(v - median) / (1.4826 * MAD) with median and MAD of `calibration` (a floor keeps a constant score finite)."""
    if not calibration:
        raise ValueError("robust_z: the calibration rows are empty")
    med = _median(calibration)
    mad = 1.4826 * _median([abs(c - med) for c in calibration])
    spread = max(mad, 1e-6 * max(1.0, abs(med)), 1e-12)
    return [(v - med) / spread for v in values]


def tail_scores(values: Sequence[float], calibration: Sequence[float], *, leave_one_out: bool = False) -> list[float]:
    """-log10 of each value's empirical tail probability among the clean calibration rows, (1 + #{c >= v}) / (1 + n):
    one scale for scores of any shape (a loss, a test statistic), so that parts can be compared. Values beyond every
    calibration row all get -log10(1 / (1 + n)); a robust z, scaled far below the gap between two tail levels, keeps
    their order. `leave_one_out`: `values` are the calibration rows themselves, each left out of its own count."""
    import bisect

    if not calibration:
        raise ValueError("tail_scores: the calibration rows are empty")
    c = sorted(calibration)
    n = len(c) - (1 if leave_one_out else 0)
    if n < 1:
        raise ValueError("tail_scores: leave-one-out needs at least two calibration rows")
    z = robust_z(values, calibration)
    out = []
    for v, zv in zip(values, z):
        at_or_above = len(c) - bisect.bisect_left(c, v) - (1 if leave_one_out else 0)
        out.append(-math.log10((1 + at_or_above) / (1 + n)) + 1e-7 * max(-100.0, min(100.0, zv)))
    return out


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


@dataclass
class Screen:
    """The screen of one training set: per training row its suspicion (`scores`), whether it is dropped
    (`flagged`), the threshold, and each part's robust z (`parts`, by name) for the training rows."""

    scores: list[float]
    flagged: list[bool]
    threshold: float
    parts: dict[str, list[float]] = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return [i for i, f in enumerate(self.flagged) if not f]

    def summary(self) -> dict:
        return dict(flagged=sum(self.flagged), rows=len(self.flagged), threshold=self.threshold)


def screen_rows(
    parts_train: dict[str, Sequence[float]], parts_calib: dict[str, Sequence[float]], *, quantile: float = 0.9
) -> Screen:
    """Combine raw scores (name -> per-row values, larger = more suspicious) of the training rows and of clean
    calibration rows into a Screen: each part's tail score against the calibration rows (`tail_scores`), a row's
    suspicion the largest over parts, and the threshold at `quantile` of the calibration rows' own suspicions
    (each left out of its own tail count)."""
    if not parts_train or set(parts_train) != set(parts_calib):
        raise ValueError(
            f"screen_rows: the training and calibration parts differ: {sorted(parts_train)} and {sorted(parts_calib)}"
        )
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile: expected a number in (0, 1), got {quantile!r}")
    t_train, t_calib = {}, {}
    for name in parts_train:
        calib = list(parts_calib[name])
        t_train[name] = tail_scores(parts_train[name], calib)
        t_calib[name] = tail_scores(calib, calib, leave_one_out=True)
    n = len(next(iter(t_train.values())))
    scores = [max(t[i] for t in t_train.values()) for i in range(n)]
    calib_max = [max(t[i] for t in t_calib.values()) for i in range(len(next(iter(t_calib.values()))))]
    threshold = _quantile(calib_max, quantile)
    return Screen(scores=scores, flagged=[s > threshold for s in scores], threshold=threshold, parts=t_train)


def write_suspects(path: str, screen: Screen) -> str:
    """suspects.csv: row (0-based, in the training file's order), score, rank (1 = most suspicious), flagged,
    and each part's z; written atomically."""
    import csv
    import io

    from .output import replace_atomically

    order = sorted(range(len(screen.scores)), key=lambda i: -screen.scores[i])
    rank = {i: r + 1 for r, i in enumerate(order)}
    names = sorted(screen.parts)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "score", "rank", "flagged"] + names)
    for i in order:
        w.writerow(
            [i, f"{screen.scores[i]:.4f}", rank[i], int(screen.flagged[i])]
            + [f"{screen.parts[n][i]:.4f}" for n in names]
        )
    replace_atomically(path, lambda f: f.write(buf.getvalue().encode("utf-8")))
    return path
