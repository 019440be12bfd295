"""Chunked frequency analysis against the paper's dense N x N filter (docs/frequency.md)."""

import pytest
import torch

from muscle_kernels.analysis import frequency_ratios, frequency_ratios_dense, low_frequency_part


@pytest.mark.parametrize("n,d,c,chunk", [(57, 5, 2, 16), (130, 12, 1, 1000), (9, 3, 4, 1)])
def test_chunked_matches_dense(n, d, c, chunk):
    torch.manual_seed(n)
    x = torch.randn(n, d)
    f = torch.randn(n, c) if c > 1 else torch.randn(n)
    sigmas = [0.05, 0.5, 2.0, 10.0]
    got = frequency_ratios(x, f, sigmas, chunk=chunk)
    ref = frequency_ratios_dense(x, f, sigmas)
    scale = f.double().norm().item()  # fp32 chunks vs fp64 dense: absolute error relative to ||f||
    for s in sigmas:
        for key in ("low", "high"):
            assert got[s][key] == pytest.approx(ref[s][key], rel=1e-4, abs=1e-5 * scale), f"sigma={s} {key}"
        if ref[s]["high"] > 1e-3 * scale:
            assert got[s]["ratio"] == pytest.approx(ref[s]["ratio"], rel=1e-3), f"sigma={s} ratio"


def test_limits_of_the_filter():
    torch.manual_seed(0)
    x, f = torch.randn(40, 4), torch.randn(40, 3)
    narrow = low_frequency_part(x, f, [1e-4])[0]  # each sample only sees itself: K f = f, no high part
    torch.testing.assert_close(narrow, f)
    wide = low_frequency_part(x, f, [1e6])[0]  # every sample sees the mean
    torch.testing.assert_close(wide, f.mean(0, keepdim=True).expand_as(f), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(x=torch.randn(5)), r"x: expected \[N, d\]"),
        (dict(f=torch.randn(4, 2)), r"f: expected \[N\] or \[N, c\] outputs with N = 5"),
        (dict(sigmas=[0.0]), r"sigmas: expected positive"),
        (dict(chunk=0), r"chunk: expected a positive"),
    ],
)
def test_errors(kw, match):
    args = dict(x=torch.randn(5, 2), f=torch.randn(5, 2), sigmas=[1.0], chunk=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        low_frequency_part(args["x"], args["f"], args["sigmas"], chunk=args["chunk"])
