"""The validated specs: AdapterSpec (the layer's hyper-parameters) and GateConfig (the alignment gate's numbers).

Each mistake has one message, and every consumer (the layer, the HF config, the training Settings, the CLI, the
aligner) raises that very message, with the field named as the consumer names it."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from muscle_kernels import GateConfig, GradientAligner, MuScleLoRALinear
from muscle_kernels._spec import SpecError
from muscle_kernels.align.step import build_aligner
from muscle_kernels.cli import main
from muscle_kernels.defense.train import Settings
from muscle_kernels.integrations.config import MuScleLoRAConfig
from muscle_kernels.nn.spec import AdapterSpec

# field -> (bad value, the one message of that mistake)
ADAPTER_MISTAKES = {
    "freq_band": [
        ((), "freq_band: expected a non-empty sequence of positive numbers such as (1, 2, 3, 4), got ()"),
        ((1, 0), "freq_band: expected a non-empty sequence of positive numbers such as (1, 2, 3, 4), got (1, 0)"),
        (
            (1, math.inf),
            "freq_band: expected a non-empty sequence of positive numbers such as (1, 2, 3, 4), got (1, inf)",
        ),
        ("12", "freq_band: expected a non-empty sequence of positive numbers such as (1, 2, 3, 4), got '12'"),
    ],
    "inner_rank": [
        (0, "inner_rank: expected an integer >= 1, got 0"),
        (2.0, "inner_rank: expected an integer >= 1, got 2.0"),
        (True, "inner_rank: expected an integer >= 1, got True"),
    ],
    "alpha": [
        (0, "alpha: expected a positive number, got 0"),
        (math.nan, "alpha: expected a positive number, got nan"),
    ],
    "dropout": [
        (1.0, "dropout: expected a probability in [0, 1), got 1.0"),
        (-0.1, "dropout: expected a probability in [0, 1), got -0.1"),
    ],
    "init": [("zeros", "init: expected one of ('lora', 'seed'), got 'zeros'")],
}
ADAPTER_CASES = [(f, v, m) for f, cases in ADAPTER_MISTAKES.items() for v, m in cases]


def message(fn):
    with pytest.raises(ValueError) as err:
        fn()
    assert isinstance(err.value, SpecError), f"expected a SpecError, got {type(err.value).__name__}: {err.value}"
    return str(err.value)


def renamed(msg, field, name):
    return msg.replace(f"{field}:", f"{name}:", 1)


@pytest.mark.parametrize("field,value,want", ADAPTER_CASES)
def test_adapter_spec_one_message_per_mistake(field, value, want):
    assert message(lambda: AdapterSpec(**{field: value})) == want
    assert message(lambda: MuScleLoRALinear(8, 4, **{field: value})) == want
    assert message(lambda: MuScleLoRALinear.from_linear(nn.Linear(8, 4), **{field: value})) == want
    # The HF config: freq_band, inner_rank, dropout, init by those names; alpha is its mslr_alpha.
    name = {"alpha": "mslr_alpha"}.get(field, field)
    assert message(lambda: MuScleLoRAConfig(lora_targets=["query"], **{name: value})) == renamed(want, field, name)
    # The training Settings: freq_band and mslr_alpha (overrides of the recipe), lora_rank.
    settings_name = {"freq_band": "freq_band", "alpha": "mslr_alpha", "inner_rank": "lora_rank"}.get(field)
    if settings_name is not None:
        assert message(lambda: Settings(**{settings_name: value})) == renamed(want, field, settings_name)


def test_lora_fields_share_the_adapter_checks():
    want = message(lambda: AdapterSpec(inner_rank=0))
    assert message(lambda: MuScleLoRAConfig(lora_targets=["q"], lora_rank=0)) == renamed(
        want, "inner_rank", "lora_rank"
    )
    want = message(lambda: AdapterSpec(alpha=-1))
    for consumer in (lambda: MuScleLoRAConfig(lora_targets=["q"], lora_alpha=-1), lambda: Settings(lora_alpha=-1)):
        assert message(consumer) == renamed(want, "alpha", "lora_alpha")


def test_cli_freq_band_uses_the_spec_check(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--freq-band", "1,-2"])
    expected = message(lambda: AdapterSpec(freq_band=(1, -2))).split(": expected ", 1)[1].rsplit(", got", 1)[0]
    assert f"argument --freq-band: expected {expected}, got '1,-2'" in capsys.readouterr().err


def test_adapter_spec_is_frozen_and_normalised():
    spec = AdapterSpec(freq_band=[1.0, 2.5, 3], inner_rank=2, alpha=6)
    assert spec.freq_band == (1, 2.5, 3) and isinstance(spec.freq_band[0], int) and spec.alpha == 6.0
    assert spec.n_branches == 3 and spec.rank == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.alpha = 1.0
    assert message(lambda: spec.replace(dropout=2.0)).startswith("dropout: expected a probability")
    assert AdapterSpec.lora(8, 32) == AdapterSpec(freq_band=(1,), inner_rank=8, alpha=32.0, init="lora")
    # any real number type goes in (a range, a tensor, a generator); a nested tensor does not
    assert AdapterSpec(freq_band=range(1, 4)).freq_band == (1, 2, 3)
    assert AdapterSpec(freq_band=torch.tensor([1.0, 2.5])).freq_band == (1, 2.5)
    assert AdapterSpec(freq_band=(k for k in (3, 4))).freq_band == (3, 4)
    assert message(lambda: AdapterSpec(freq_band=[torch.ones(2)])).startswith("freq_band: expected a non-empty")


def test_adapter_defaults_are_the_specs():
    layer = MuScleLoRALinear(8, 4)
    assert layer.spec == AdapterSpec()
    config = MuScleLoRAConfig(lora_targets=["q"])
    default = AdapterSpec()
    assert (tuple(config.freq_band), config.inner_rank, config.dropout, config.init) == (
        default.freq_band,
        default.inner_rank,
        default.dropout,
        default.init,
    )
    assert config.mslr_spec() == default.replace(alpha=config.mslr_alpha)
    assert config.lora_spec() == AdapterSpec.lora(config.lora_rank, config.lora_alpha)


def test_from_linear_takes_a_spec_or_fields_not_both():
    spec = AdapterSpec(freq_band=(1, 3), inner_rank=2, alpha=5.0, init="seed")
    layer = MuScleLoRALinear.from_linear(nn.Linear(8, 4), spec)
    assert layer.spec == spec and layer.lora_L.shape == (4, 8) and layer.lora_R.shape == (4, 4)
    assert torch.equal(layer.scales, torch.tensor([2.5, 2.5, 7.5, 7.5]))
    with pytest.raises(TypeError, match=r"spec: given together with \['alpha'\]"):
        MuScleLoRALinear.from_linear(nn.Linear(8, 4), spec, alpha=2.0)
    with pytest.raises(TypeError, match="spec: expected an AdapterSpec"):
        MuScleLoRALinear.from_linear(nn.Linear(8, 4), {"alpha": 2.0})


# --- the gate ---------------------------------------------------------------------------------------------------
GATE_MISTAKES = [
    ("min_ref_grad_norm", -1e-9, "min_ref_grad_norm: expected a number >= 0, got -1e-09"),
    ("min_ref_loss", -1.0, "min_ref_loss: expected a number >= 0, got -1.0"),
    ("min_ref_loss", math.inf, "min_ref_loss: expected a number >= 0, got inf"),
    ("max_raw_ratio", 1.5, "max_raw_ratio: expected a fraction in [0, 1], got 1.5"),
    ("warmup_epochs", -1, "warmup_epochs: expected an integer >= 0, got -1"),
    ("warmup_epochs", 0.5, "warmup_epochs: expected an integer >= 0, got 0.5"),
]


def _params():
    return [nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("field,value,want", GATE_MISTAKES)
def test_gate_one_message_per_mistake(field, value, want):
    assert message(lambda: GateConfig(**{field: value})) == want
    assert message(lambda: GradientAligner(_params(), [0], lambda m, b: b, epochs=3, **{field: value})) == want
    assert message(lambda: build_aligner(_params(), [0], lambda m, b: b, epochs=3, **{field: value})) == want
    name = {"warmup_epochs": "ga_warmup_epochs"}.get(field, field)
    assert message(lambda: Settings(**{name: value})) == renamed(want, field, name)


def test_cli_gate_option_reports_the_gate_message(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--min-ref-loss", "-1"])
    assert message(lambda: GateConfig(min_ref_loss=-1.0)) in capsys.readouterr().err


def test_gate_defaults_are_written_once():
    gate = GateConfig()
    assert Settings().gate() == gate
    assert GradientAligner(_params(), [0], lambda m, b: b, epochs=3).gate_config == gate
    assert build_aligner(_params(), [0], lambda m, b: b, epochs=3).gate_config == gate
    # single fields override a given gate; the rest stays
    custom = GateConfig(min_ref_loss=0.0, max_raw_ratio=0.2)
    aligner = GradientAligner(_params(), [0], lambda m, b: b, epochs=3, gate=custom, warmup_epochs=2)
    assert aligner.gate_config == custom.replace(warmup_epochs=2)
    with pytest.raises(TypeError, match="gate: expected a GateConfig"):
        GradientAligner(_params(), [0], lambda m, b: b, epochs=3, gate={"min_ref_loss": 0.0})


def test_blend_rule_too_few_epochs_never_blends():
    gate = GateConfig(warmup_epochs=2, max_raw_ratio=0.1)
    assert gate.for_epochs(3) is gate
    for epochs in (1, 2):
        fitted = gate.for_epochs(epochs)
        assert fitted.max_raw_ratio == 0.0 and fitted.replace(max_raw_ratio=0.1) == gate
        assert fitted.decide(0.0, 0.0, epoch=epochs - 1, epochs=epochs) == ("raw", None)
    # the aligner itself insists on a consistent schedule; the training path fits the gate first
    with pytest.raises(ValueError, match="epochs: must be greater than warmup_epochs"):
        GradientAligner(_params(), [0], lambda m, b: b, epochs=2, gate=gate)
    assert build_aligner(_params(), [0], lambda m, b: b, epochs=2, gate=gate).gate_config.max_raw_ratio == 0.0
    assert gate.decide(1.0, 1.0, 0, 3) == ("replace", 0.0)
    assert gate.decide(0.0, 1.0, 2, 3) == ("blend", 0.0)
    assert gate.decide(0.0, 1.0, 3, 3) == ("blend", 0.1)
