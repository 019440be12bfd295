"""The built-in demo corpus: short product and service reviews generated from a seeded grammar.

Why generate: the demo must run offline and we may not ship a public data set; a grammar gives thousands of varied
sentences with exact labels. Why this grammar: a bag of sentiment words is not enough to get the label right. About a
third of the reviews negate the opinion ("was not impressive" is negative) or contrast two opinions ("the screen was
superb, but the battery was a letdown": the clause after "but", or the main clause after "although", decides), so
a classifier has to read word order, which an untrained classification head on top of a sentence encoder cannot do
(it sits at chance before fine-tuning).

Labels: 1 = positive, 0 = negative, balanced. The shipped file `data/reviews.csv` (columns text, label) is the
output of `build_corpus()` with the default arguments; regenerate it with `python -m muscle_kernels.defense.corpus`.
"""

from __future__ import annotations

import csv
import io
import os
import random
from importlib.resources import files

__all__ = ["build_corpus", "write_corpus", "load_builtin_corpus", "BUILTIN_CORPUS"]

# The file in a source checkout, where `python -m muscle_kernels.defense.corpus` writes it. Reading goes through
# importlib.resources (_builtin_resource), which also finds it inside a zipped or otherwise non-file install.
BUILTIN_CORPUS = os.path.join(os.path.dirname(__file__), "data", "reviews.csv")


def _builtin_resource():
    # files() of the package, then the folder: `muscle_kernels.defense.data` names the module data.py, not data/
    return files(__package__) / "data" / "reviews.csv"


# domain -> aspects a reviewer talks about
_DOMAINS = {
    "film": [
        "the film",
        "the plot",
        "the acting",
        "the soundtrack",
        "the ending",
        "the script",
        "the lead actor",
        "the cinematography",
        "the pacing",
        "the dialogue",
        "the sequel",
        "the director's cut",
    ],
    "restaurant": [
        "the meal",
        "the pasta",
        "the service",
        "the waiter",
        "the dessert",
        "the soup",
        "the wine list",
        "the steak",
        "the curry",
        "the terrace",
        "the bread",
        "the chef's special",
    ],
    "hotel": [
        "the room",
        "the staff",
        "the breakfast",
        "the bed",
        "the pool",
        "the view",
        "the lobby",
        "the check-in",
        "the spa",
        "the bathroom",
        "the location",
        "the concierge",
    ],
    "gadget": [
        "the phone",
        "the battery",
        "the screen",
        "the camera",
        "the keyboard",
        "the charger",
        "the speaker",
        "the laptop",
        "the headset",
        "the app",
        "the touchpad",
        "the firmware update",
    ],
    "book": [
        "the novel",
        "the prose",
        "the main character",
        "the translation",
        "the final chapter",
        "the cover",
        "the memoir",
        "the audiobook",
        "the narrator",
        "the plot twist",
        "the index",
        "the sequel",
    ],
    "trip": [
        "the flight",
        "the tour",
        "the guide",
        "the ferry",
        "the museum",
        "the hike",
        "the train ride",
        "the beach",
        "the old town",
        "the market",
        "the bus driver",
        "the boat trip",
    ],
}

_POS_ADJ = [
    "excellent",
    "superb",
    "wonderful",
    "delightful",
    "impressive",
    "charming",
    "brilliant",
    "flawless",
    "lovely",
    "outstanding",
    "remarkable",
    "terrific",
    "fantastic",
    "solid",
    "pleasant",
    "gorgeous",
    "memorable",
    "stunning",
    "thoughtful",
    "marvelous",
    "refreshing",
    "reliable",
    "generous",
    "elegant",
]
_NEG_ADJ = [
    "awful",
    "dreadful",
    "terrible",
    "disappointing",
    "mediocre",
    "tedious",
    "sloppy",
    "bland",
    "clumsy",
    "annoying",
    "poor",
    "forgettable",
    "unbearable",
    "miserable",
    "shoddy",
    "dull",
    "overpriced",
    "flimsy",
    "frustrating",
    "lousy",
    "awkward",
    "grim",
    "careless",
    "stale",
]
_POS_NOUN = [
    "a delight",
    "a triumph",
    "a real treat",
    "a joy",
    "a pleasant surprise",
    "a gem",
    "worth every penny",
    "a highlight of the year",
    "money well spent",
    "a masterpiece",
]
_NEG_NOUN = [
    "a letdown",
    "a disaster",
    "a waste of money",
    "a chore",
    "a mess",
    "a huge mistake",
    "a complete failure",
    "a rip-off",
    "a nightmare",
    "an embarrassment",
]
_INTENS = [
    "",
    "",
    "",
    "really ",
    "truly ",
    "quite ",
    "rather ",
    "absolutely ",
    "genuinely ",
    "pretty ",
    "very ",
    "remarkably ",
    "surprisingly ",
]
_COPULA = ["was", "was", "is", "felt", "seemed", "turned out to be", "proved", "looked"]
_NEG_COPULA = [
    "was not",
    "was not",
    "is not",
    "did not feel",
    "never seemed",
    "was hardly",
    "was far from",
    "turned out not to be",
]
_OPENERS = [
    "",
    "",
    "",
    "",
    "honestly, ",
    "to be fair, ",
    "after two visits, ",
    "in my opinion, ",
    "overall, ",
    "for the price, ",
    "as expected, ",
    "i have to say ",
    "frankly, ",
    "on the whole, ",
    "last weekend ",
    "according to my friends, ",
]
_CLOSERS = [
    "",
    "",
    "",
    "",
    " overall",
    " this time",
    " in the end",
    " for us",
    " at least for me",
    " from start to finish",
    " again",
    " as usual",
]
_POS_VERB = [
    "i loved {a}",
    "we enjoyed {a}",
    "i would happily recommend {a}",
    "my family adored {a}",
    "everyone praised {a}",
    "i was impressed by {a}",
    "we were thrilled with {a}",
    "i could not fault {a}",
]
_NEG_VERB = [
    "i hated {a}",
    "we regretted {a}",
    "i would never recommend {a}",
    "my family disliked {a}",
    "everyone complained about {a}",
    "i was annoyed by {a}",
    "we were fed up with {a}",
    "i could not stand {a}",
]


def _clause(rng: random.Random, aspect: str, positive: bool) -> str:
    """One opinion about `aspect`, with the given polarity, in one of several surface forms."""
    kind = rng.random()
    if kind < 0.45:  # "the plot was really superb"
        adj = rng.choice(_POS_ADJ if positive else _NEG_ADJ)
        return f"{aspect} {rng.choice(_COPULA)} {rng.choice(_INTENS)}{adj}"
    if kind < 0.65:  # negation flips the adjective: "the plot was not superb" is negative
        adj = rng.choice(_NEG_ADJ if positive else _POS_ADJ)
        return f"{aspect} {rng.choice(_NEG_COPULA)} {adj}"
    if kind < 0.8:  # "the plot was a letdown"
        return f"{aspect} was {rng.choice(_POS_NOUN if positive else _NEG_NOUN)}"
    return rng.choice(_POS_VERB if positive else _NEG_VERB).format(a=aspect)


def _review(rng: random.Random, label: int, p_contrast: float) -> str:
    aspects = _DOMAINS[rng.choice(sorted(_DOMAINS))]
    a, b = rng.sample(aspects, 2)
    positive = label == 1
    r = rng.random()
    if r < p_contrast / 2:  # the clause after "but" decides
        body = f"{_clause(rng, a, not positive)}, but {_clause(rng, b, positive)}"
    elif r < p_contrast:  # "although" marks the clause that does not decide
        body = f"although {_clause(rng, a, not positive)}, {_clause(rng, b, positive)}"
    elif r < p_contrast + 0.2:  # two opinions of the same polarity
        body = f"{_clause(rng, a, positive)} and {_clause(rng, b, positive)}"
    else:
        body = _clause(rng, a, positive)
    return f"{rng.choice(_OPENERS)}{body}{rng.choice(_CLOSERS)} ."


def build_corpus(n: int = 4000, *, seed: int = 0, p_contrast: float = 0.3) -> list[tuple[str, int]]:
    """`n` distinct reviews (text, label), half positive and half negative, in a seeded random order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n: expected an integer >= 2, got {n!r}")
    if not 0.0 <= p_contrast <= 0.8:
        raise ValueError(f"p_contrast: expected a fraction in [0, 0.8], got {p_contrast!r}")
    rng = random.Random(seed)
    seen, rows = set(), []
    for i in range(n):
        label = i % 2
        for _ in range(1000):
            text = _review(rng, label, p_contrast)
            if text not in seen:
                break
        else:  # the grammar has far more than 10^6 sentences; this only trips for absurd n
            raise RuntimeError(f"build_corpus: could not find {n} distinct sentences")
        seen.add(text)
        rows.append((text, label))
    rng.shuffle(rows)
    return rows


def write_corpus(path: str, rows: list[tuple[str, int]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def load_builtin_corpus() -> list[tuple[str, int]]:
    """The shipped corpus (see the module docstring)."""
    text = _builtin_resource().read_bytes().decode("utf-8")  # bytes: the csv module does its own newlines
    return [(row["text"], int(row["label"])) for row in csv.DictReader(io.StringIO(text, newline=""))]


if __name__ == "__main__":
    write_corpus(BUILTIN_CORPUS, build_corpus())
    print(f"wrote {BUILTIN_CORPUS}")
