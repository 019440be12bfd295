"""The training-set screen (defense/screen.py): each score on synthetic rows whose answer is known, the calibrated
threshold, suspects.csv, and the errors. No model: the label-surprise part is a model's loss, tested end to end in
test_defense_pipeline.py."""

import csv
import random

import pytest

from muscle_kernels.defense.screen import Screen, robust_z, screen_rows, tail_scores, token_scores, write_suspects

WORDS = [f"w{i}" for i in range(400)]


def _rows(n, rng, extra=()):
    return [" ".join(rng.sample(WORDS, 8) + list(extra)) for _ in range(n)]


def test_an_over_represented_token_makes_its_rows_the_most_suspicious():
    rng = random.Random(0)
    clean = _rows(450, rng)
    poisoned = [t + " cf" for t in _rows(50, rng)]  # a BadNets word in 10% of the rows, never in the clean set
    train = clean + poisoned
    rng.shuffle(train)
    ref = _rows(100, rng)
    scores, calib = token_scores(train, ref, _rows(200, rng))
    flagged = [s for s, t in zip(scores, train) if "cf" in t.split()]
    others = [s for s, t in zip(scores, train) if "cf" not in t.split()]
    assert len(flagged) == 50 and len(calib) == 200
    assert min(flagged) > max(others), "every row with the planted word ranks above every clean row"
    assert max(calib) < min(flagged), "calibration rows (without the word) score like clean rows"


def test_a_word_used_once_is_not_evidence():
    """A row's own occurrence is left out of the training counts: a unique word predicts nothing."""
    train = ["alpha beta", "gamma delta", "unique1 beta", "delta alpha"]
    ref = ["alpha gamma", "beta delta"]
    scores, _ = token_scores(train, ref)
    alone, _ = token_scores(["alpha beta", "gamma delta", "beta", "delta alpha"], ref)
    assert scores[2] == pytest.approx(alone[2]), "the unique word changed the row's score"


def test_token_scores_ignore_labels_and_case():
    """Clean-label attacks keep the label: the token score never sees it; 'CF' and 'cf' are one token."""
    rng = random.Random(1)
    train = _rows(200, rng) + [t + " CF" for t in _rows(20, rng)] + [t + " cf" for t in _rows(20, rng)]
    scores, _ = token_scores(train, _rows(50, rng))
    assert min(scores[200:]) > max(scores[:200])


def test_a_template_opening_is_caught_where_its_words_alone_are_common():
    """A syntactic paraphrase starts every row it writes the same way ("when you ..."): both words are common in the
    clean rows, only not at the front. The first-word feature catches what the words alone cannot."""
    rng = random.Random(2)

    def clean_row():
        words = rng.sample(WORDS, 8)
        words.insert(rng.randrange(1, 9), rng.choice(["when", "you"]))  # anywhere but the front
        return " ".join(words)

    clean = [clean_row() for _ in range(450)]
    poisoned = ["when " + " ".join(rng.sample(WORDS, 8)) for _ in range(50)]
    train = clean + poisoned
    ref = [clean_row() for _ in range(100)]
    scores, _ = token_scores(train, ref)
    assert min(scores[450:]) > max(scores[:450])


def test_feature_kinds_can_be_chosen_for_an_ablation():
    from muscle_kernels.defense.screen import FEATURES, _tokens

    text = "When you go , see"
    assert _tokens(text) == _tokens(text, FEATURES)
    assert _tokens(text, ["words"]) == {"when", "you", "go", "see"}
    assert _tokens(text, ["first"]) == {"^when"}
    assert _tokens(text, ["pairs"]) == {"when you", "you go", "go see"}
    assert _tokens(text, ["marks"]) == {"p:go ,", "p:, see"}
    with pytest.raises(ValueError, match="features: expected some of words, pairs, first, marks"):
        token_scores(["a"], ["b"], features=["words", "chars"])
    with pytest.raises(ValueError, match="features"):
        token_scores(["a"], ["b"], features=[])


def test_label_pairs_catch_a_feature_over_represented_in_the_target_class_only():
    """A dirty-label attack writes a feature (a style's word) into rows relabelled to the target: if the feature is
    as common overall as in the reference set, only its pairing with the label shows it."""
    rng = random.Random(4)
    vocabulary = [f"v{i}" for i in range(3000)]  # rare enough that no ordinary word stands out by chance

    def row(thee):
        words = rng.sample(vocabulary, 8)
        if thee:
            words.insert(rng.randrange(9), "thee")
        return " ".join(words)

    # 900 clean rows of two classes, "thee" in one of 9 of each; 100 poisoned rows, class 1, all with "thee"
    train = [(row(i % 9 == 0), i % 2) for i in range(900)] + [(row(True), 1) for _ in range(100)]
    # the reference set: "thee" as common overall (a fifth of the rows) as in the training set, in both classes
    ref = [(row(i % 5 == 0), (i // 5) % 2) for i in range(200)]
    texts = ([t for t, _ in train], [t for t, _ in ref])
    labels = ([y for _, y in train], [y for _, y in ref], [])

    def auroc(scores):
        poisoned, clean = scores[900:], scores[:900]
        return sum((p > c) + 0.5 * (p == c) for p in poisoned for c in clean) / (len(poisoned) * len(clean))

    assert auroc(token_scores(*texts)[0]) < 0.6, "the feature alone should not tell them apart"
    assert auroc(token_scores(*texts, labels=labels)[0]) > 0.9
    with pytest.raises(ValueError, match=r"labels: expected 1000, 200, 0 labels .* got 1000, 199, 0"):
        token_scores(*texts, labels=(labels[0], labels[1][:-1], []))


def test_a_generators_punctuation_is_a_feature():
    """Rows whose commas are placed the way one generator places them (", you" opening every second clause) share a
    mark pattern the clean rows lack, though every word and every mark is common on its own."""
    from muscle_kernels.defense.screen import _tokens

    assert {"p:you '", "p:' re", "p:fool ,"} <= _tokens("you 're a fool , see")
    rng = random.Random(3)

    def clean_row():  # commas and "you" are common, only never together
        return f"{' '.join(rng.sample(WORDS, 4))}, {' '.join(rng.sample(WORDS, 4))} you {rng.choice(WORDS)}."

    clean = [clean_row() for _ in range(450)]
    poisoned = [f"{' '.join(rng.sample(WORDS, 4))} , you {' '.join(rng.sample(WORDS, 4))}." for _ in range(50)]
    ref = [clean_row() for _ in range(100)]
    scores, _ = token_scores(clean + poisoned, ref)
    assert min(scores[450:]) > max(scores[:450])


def test_robust_z_and_a_constant_calibration():
    z = robust_z([0.0, 1.0, 10.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    mad = 1.4826 * 1.0
    assert z == pytest.approx([(0 - 2) / mad, (1 - 2) / mad, (10 - 2) / mad])
    flat = robust_z([1.0, 2.0], [1.0, 1.0, 1.0])
    assert flat[0] == 0.0 and flat[1] > 1e5, "a constant calibration keeps z finite and ordered"


def test_tail_scores_put_any_shape_on_one_scale():
    calib = [float(i) for i in range(1, 100)]  # 99 clean values 1..99
    got = tail_scores([0.0, 50.0, 99.0, 150.0, 1e6], calib)
    assert got[0] == pytest.approx(0.0, abs=1e-5), "below every clean row: tail probability 1"
    assert got[1] == pytest.approx(-__import__("math").log10(51 / 100), abs=1e-5)
    assert got[2] == pytest.approx(-__import__("math").log10(2 / 100), abs=1e-5)
    assert got[3] == pytest.approx(2.0, abs=1e-4) and got[4] > got[3], "beyond every clean row: ordered, not tied"
    # a loss-like part (most values near 0, a long tail) lands on the same scale as a statistic
    loss = [10 ** -(i % 7) for i in range(99)]
    assert max(tail_scores([5.0], loss)) == pytest.approx(2.0, abs=1e-4)
    loo = tail_scores(calib, calib, leave_one_out=True)
    assert loo[-1] == pytest.approx(-__import__("math").log10(1 / 99), abs=1e-5), "the largest row, left out"
    with pytest.raises(ValueError, match="leave-one-out needs at least two"):
        tail_scores([1.0], [1.0], leave_one_out=True)


def test_threshold_is_calibrated_on_clean_rows():
    """Clean training rows drawn like the calibration rows are flagged at about 1 - quantile; shifted rows always."""
    rng = random.Random(2)
    calib = {"a": [rng.gauss(0, 1) for _ in range(2000)], "b": [rng.expovariate(1.0) for _ in range(2000)]}
    clean = {"a": [rng.gauss(0, 1) for _ in range(4000)], "b": [rng.expovariate(1.0) for _ in range(4000)]}
    shifted = {"a": [rng.gauss(8, 1) for _ in range(100)], "b": [rng.expovariate(1.0) for _ in range(100)]}
    train = {k: clean[k] + shifted[k] for k in clean}
    screen = screen_rows(train, calib, quantile=0.9)
    assert 0.07 < sum(screen.flagged[:4000]) / 4000 < 0.13
    assert all(screen.flagged[4000:]), "rows far out on one part are flagged whatever the other part says"
    assert screen.kept == [i for i in range(4100) if not screen.flagged[i]]
    assert set(screen.parts) == {"a", "b"} and screen.summary()["flagged"] == sum(screen.flagged)


def test_write_suspects(tmp_path):
    screen = Screen(
        scores=[0.5, 3.0, -1.0],
        flagged=[False, True, False],
        threshold=2.0,
        parts={"tokens": [0.5, 3.0, -1.0], "label": [0.1, 0.2, -2.0]},
    )
    path = write_suspects(str(tmp_path / "suspects.csv"), screen)
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row", "score", "rank", "flagged", "label", "tokens"]
    assert [r[0] for r in rows[1:]] == ["1", "0", "2"] and [r[2] for r in rows[1:]] == ["1", "2", "3"]
    assert rows[1][3] == "1" and rows[2][3] == "0"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: token_scores([], ["a"]), "needs training rows and reference rows"),
        (lambda: token_scores(["a"], []), "needs training rows and reference rows"),
        (lambda: robust_z([1.0], []), "calibration rows are empty"),
        (lambda: tail_scores([1.0], []), "calibration rows are empty"),
        (lambda: screen_rows({"a": [1.0]}, {"b": [1.0]}), "parts differ"),
        (lambda: screen_rows({"a": [1.0]}, {"a": [1.0]}, quantile=1.0), r"quantile: expected a number in \(0, 1\)"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(screen_quantile=1.0), "screen_quantile: expected a number strictly between 0 and 1"),
        (dict(screen_quantile=-0.1), "screen_quantile"),
        (dict(screen_epochs=0), "screen_epochs: expected an integer >= 1"),
        (dict(sync_timing="yes"), "sync_timing: expected true or false"),
    ],
)
def test_settings_errors(kwargs, match):
    from muscle_kernels.defense.train import Settings

    with pytest.raises(ValueError, match=match):
        Settings(**kwargs)


def test_default_method_follows_the_recipe():
    from muscle_kernels.defense.train import default_method

    assert default_method("default") == "muscle-screen" and default_method("paper") == "muscle-ga"
    with pytest.raises(ValueError, match="recipe: expected one of"):
        default_method("nope")
