"""pytest-benchmark smoke suite over the CPU benchmark's cases (benchmarks/bench_linear_cpu.py), at small sizes.

In the test run (`--benchmark-disable`, set in pyproject.toml) each case runs once, as a smoke test that every provider
still works and that all providers compute the same thing. For numbers:
    pytest tests/test_benchmark_smoke.py --benchmark-enable --benchmark-only
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_linear_cpu import make_layers  # noqa: E402

CASES = [(64, 48, 40, (1,), 8), (33, 64, 96, (1, 2, 3, 4), 2)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["bare", "peft", "paper", "ours"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-n{len(c[3])}r{c[4]}")
def test_linear_cpu(benchmark, case, provider, mode):
    tokens, in_f, out_f, band, rank = case
    layers = make_layers(in_f, out_f, band, rank)
    if provider not in layers:
        pytest.skip(f"{provider} is not installed")
    layer = layers[provider]
    x = torch.randn(tokens, in_f, requires_grad=True)
    dy = torch.randn(tokens, out_f)

    def step():
        y = layer(x)
        if mode == "fwd+bwd":
            y.backward(dy)
        return y

    y = benchmark(step)
    # every provider computes the same function of x (bare: without the adapter)
    ref = (
        layers["paper"](x)
        if provider != "bare"
        else torch.nn.functional.linear(x, layers["bare"].weight, layers["bare"].bias)
    )
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
