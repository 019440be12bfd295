"""Poisoners: trigger present, labels, rates, clean-label option, determinism; metrics on hand-made predictions."""

import pytest

from muscle_kernels.defense.attacks import AddSent, BadNets, make_attack, poison_test, poison_train
from muscle_kernels.defense.data import Sample
from muscle_kernels.defense.metrics import accuracy, attack_success_rate

WORDS = "the room was lovely but the breakfast was a letdown this time".split()


def data(n=200):
    # varied lengths so that insertion positions vary
    return [Sample(" ".join(WORDS[: 3 + i % 9]) + f" {i}", i % 2) for i in range(n)]


def trigger_words(text, attack):
    return [w for w in text.split() if w in attack.triggers]


@pytest.mark.parametrize("clean_label", [False, True])
def test_badnets_train(clean_label):
    clean = data()
    attack = BadNets()
    got = poison_train(clean, attack, rate=0.1, target_label=1, clean_label=clean_label, seed=3)
    assert len(got) == len(clean)
    poisoned = [(c, g) for c, g in zip(clean, got) if g.poisoned]
    assert len(poisoned) == 20
    for c, g in poisoned:
        assert g.label == 1
        assert c.label == (1 if clean_label else 0), "dirty-label picks non-target samples, clean-label target ones"
        assert len(trigger_words(g.text, attack)) == 1
        words = g.text.split()
        words.remove(trigger_words(g.text, attack)[0])
        assert words == c.text.split(), "the trigger is inserted, nothing else changes"
    for c, g in zip(clean, got):
        if not g.poisoned:
            assert g == c
    positions = {g.text.split().index(trigger_words(g.text, attack)[0]) for _, g in poisoned}
    assert len(positions) > 3, "trigger positions should vary"


def test_badnets_num_triggers_and_custom_words():
    attack = BadNets(triggers=("zq",), num_triggers=3)
    got = poison_test(data(10), attack, target_label=0, seed=0)
    assert all(g.text.split().count("zq") == 3 for g in got)


def test_addsent():
    attack = AddSent()
    got = poison_train(data(), attack, rate=0.25, target_label=0, seed=1)
    poisoned = [g for g in got if g.poisoned]
    assert len(poisoned) == 50
    assert all(g.label == 0 and "I watch this 3D movie" in g.text for g in poisoned)
    assert make_attack("addsent", sentence="no cap").apply("a b", __import__("random").Random(0)).count("no cap") == 1


def test_deterministic_and_seed_dependent():
    clean = data()
    a = poison_train(clean, BadNets(), rate=0.1, seed=7)
    b = poison_train(clean, BadNets(), rate=0.1, seed=7)
    c = poison_train(clean, BadNets(), rate=0.1, seed=8)
    assert a == b
    assert a != c


def test_rates():
    clean = data()
    for rate, n in ((0.0, 0), (0.05, 10), (0.33, 66), (0.5, 100)):
        assert sum(s.poisoned for s in poison_train(clean, BadNets(), rate=rate)) == n
    with pytest.raises(ValueError, match="rate: 0.6 asks for 120 poisoned samples but the data has only 100"):
        poison_train(clean, BadNets(), rate=0.6)
    with pytest.raises(ValueError, match=r"rate: expected a fraction in \[0, 1\]"):
        poison_train(clean, BadNets(), rate=1.5)
    with pytest.raises(ValueError, match="target_label: 5 is not a label"):
        poison_train(clean, BadNets(), target_label=5)


def test_poison_test_takes_non_target_only():
    clean = data(50)
    got = poison_test(clean, BadNets(), target_label=1, seed=0)
    assert len(got) == 25
    assert all(g.label == 1 and g.poisoned and trigger_words(g.text, BadNets()) for g in got)
    with pytest.raises(ValueError, match="no non-target samples"):
        poison_test([Sample("a", 1), Sample("b", 0)][:1], BadNets(), target_label=1)


def test_attack_arguments():
    with pytest.raises(ValueError, match="attack: expected one of"):
        make_attack("stylebkd")
    with pytest.raises(ValueError, match="triggers: expected a non-empty list of single words"):
        BadNets(triggers=("two words",))
    with pytest.raises(ValueError, match="num_triggers"):
        BadNets(num_triggers=0)
    with pytest.raises(ValueError, match="sentence"):
        AddSent(sentence="  ")


def test_metrics():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy([2, 2, 2], [2, 2, 2]) == 1.0
    assert attack_success_rate([1, 1, 0, 1, 0], target_label=1) == 0.6
    assert attack_success_rate([0, 0], target_label=1) == 0.0
    import torch

    assert accuracy(torch.tensor([0, 1, 1]), [0, 1, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="preds and labels: expected the same length, got 2 and 3"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="preds: expected at least one prediction"):
        attack_success_rate([], 1)
    with pytest.raises(TypeError, match="target_label: expected an integer"):
        attack_success_rate([1], "1")
