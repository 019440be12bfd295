"""Gradient alignment on 2 real gloo ranks (CPU): DDP and FSDP2 against one process that sees both ranks' batches,
the collectives the alignment issues, a rank with a non-finite reference loss, and the two-stage op on shards.

The ranks are spawned once for the module (process start-up dominates) and every test reads their results; a rank
that hangs fails the fixture at its deadline (see tests/_dist_workers.spawn)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from . import _dist_workers as W

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

CFGS = tuple(W.CONFIGS)
# The tests that read the two spawned ranks' results are the slow lane (spawning them takes most of a minute on a
# 2-core CPU); the single-process checks below them stay in the fast lane.
two_ranks = pytest.mark.slow


@pytest.fixture(scope="module")
def single():
    return {cfg: W.single_process(cfg) for cfg in CFGS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return W.spawn(
        W.all_programs, tmp_path_factory.mktemp("ranks"), CFGS, 7, timeout=600
    )  # a hang fails here; a loaded 2-core machine needs minutes


@pytest.fixture(scope="module")
def ddp_runs(runs):
    return [r["ddp"] for r in runs]


@pytest.fixture(scope="module")
def fsdp_runs(runs):
    return [r["fsdp"] for r in runs]


@pytest.fixture(scope="module")
def misc_runs(runs):
    return [r["misc"] for r in runs]


def _check_against_single(runs, single, cfg, tol):
    want_params, want_branches, want_loss = single[cfg]
    for rank, run in enumerate(runs):
        r = run[cfg]
        assert r["branches"] == want_branches, f"rank {rank}: branches {r['branches']} != one process {want_branches}"
        for step, (a, b) in enumerate(zip(r["ref_loss"], want_loss)):
            assert math.isclose(a, b, rel_tol=1e-5), f"rank {rank} step {step}: ref loss {a} != one process {b}"
        for i, (a, b) in enumerate(zip(r["params"], want_params)):
            err = float((a - b).abs().max())
            assert err <= tol * float(b.abs().max()), f"rank {rank} param {i}: differs from one process by {err}"


def test_configs_cover_every_branch(single):
    seen = {b for _, branches, _ in single.values() for b in branches}
    assert seen == {"replace", "blend", "raw"}, seen


@two_ranks
@pytest.mark.parametrize("cfg", CFGS)
def test_ddp_ranks_identical_and_equal_to_one_process(ddp_runs, single, cfg):
    for a, b in zip(ddp_runs[0][cfg]["params"], ddp_runs[1][cfg]["params"]):
        assert torch.equal(a, b), "the replicas drifted apart"
    _check_against_single(ddp_runs, single, cfg, tol=1e-5)


@two_ranks
@pytest.mark.parametrize("variant", sorted(W.DDP_VARIANTS))
def test_ddp_variants_equal_to_one_process(ddp_runs, single, variant):
    # static_graph counts the reducer's hooks and find_unused_parameters walks the graph: neither may see the
    # reference backward
    key = f"replace/{variant}"
    _check_against_single([{"replace": run[key]} for run in ddp_runs], single, "replace", tol=1e-5)


@two_ranks
@pytest.mark.parametrize("cfg", CFGS + tuple(f"replace/{v}" for v in sorted(W.DDP_VARIANTS)))
def test_ddp_one_allreduce_and_no_reducer_traffic(ddp_runs, cfg):
    for rank, run in enumerate(ddp_runs):
        r = run[cfg]
        # the probe sees DDP's own gradient all-reduce in a plain backward ...
        assert any(name == "allreduce_" for name, _ in r["plain"]), r["plain"]
        # ... and in an aligned step exactly one all-reduce: every reference gradient (fp32 here, one bucket) plus
        # the fp32 tail (loss, one reached-flag per tensor); nothing from the reducer
        want = [("allreduce_", 4 * (r["numel"] + r["n_params"] + 1))]
        for step, calls in r["collectives"].items():
            assert calls == want, f"rank {rank} step {step}: {calls} != {want}"


@two_ranks
@pytest.mark.parametrize("cfg", CFGS)
def test_fsdp2_equal_to_one_process(fsdp_runs, single, cfg):
    for a, b in zip(fsdp_runs[0][cfg]["params"], fsdp_runs[1][cfg]["params"]):
        assert torch.equal(a, b)
    _check_against_single(fsdp_runs, single, cfg, tol=1e-5)


@two_ranks
@pytest.mark.parametrize("cfg", CFGS)
def test_fsdp2_alignment_gathers_no_gradient(fsdp_runs, cfg):
    for rank, run in enumerate(fsdp_runs):
        r = run[cfg]
        if rank == 1:
            assert 0 in r["local_numel"], "rank 1 should hold an empty shard"
        plain = r["plain"]
        assert any(n == "_reduce_scatter_base_" for n, _ in plain) and any(n == "_allgather_base_" for n, _ in plain)
        for step, calls in r["collectives"].items():
            # the reference forward + backward is FSDP's own (parameter all-gathers, gradient reduce-scatters),
            # once per reference batch; the alignment adds one [n + 1, 3] fp32 all-reduce and nothing else
            fsdp_part = [c for c in calls if c[0] != "allreduce_"]
            assert sorted(fsdp_part) == sorted(plain * r["n_batches"]), f"rank {rank} step {step}: {calls}"
            assert [c for c in calls if c[0] == "allreduce_"] == [("allreduce_", 12 * (r["n_params"] + 1))]


@two_ranks
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_nonfinite_reference_loss_on_one_rank(misc_runs, engine):
    for rank, run in enumerate(misc_runs):
        for step, r in run["nonfinite"][engine].items():
            assert r["branch"] == "raw", f"{engine} rank {rank} step {step}: branch {r['branch']}"
            assert not math.isfinite(r["ref_loss"]), "the gate must see the global (non-finite) loss"
            assert r["unchanged"], f"{engine} rank {rank} step {step}: the training gradient was modified"


@two_ranks
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_two_stage_op_on_shards_equals_whole_tensors(misc_runs, rho):
    assert misc_runs[1]["split"][rho]["empty"].count(True) == 2, "rank 1 should hold two empty shards"
    for rank, run in enumerate(misc_runs):
        r = run["split"][rho]
        assert r["stats_err"] < 1e-5, f"rank {rank}: summed shard stats differ from whole-tensor stats"
        for i, (err, dtype) in enumerate(zip(r["errs"], r["dtypes"])):
            tol = {"torch.float64": 1e-12, "torch.float32": 1e-6}.get(dtype, 1e-2)
            assert err <= tol, f"rank {rank} tensor {i} ({dtype}): shard result off by {err} (relative)"


@two_ranks
def test_bucketed_reference_average(misc_runs):
    results = [run["buckets"] for run in misc_runs]
    inputs = [r["inputs"] for r in results]
    for rank, r in enumerate(results):
        assert r["loss"] == 1.5, "the loss is the mean over the ranks"
        assert len(r["calls"]) > 3 and all(name == "allreduce_" for name, _ in r["calls"]), r["calls"]
        assert r["out"][4] is None, "a tensor no rank's loss reaches stays None"
        for i, got in enumerate(r["out"]):
            if i == 4:
                continue
            # tensor 2 is reached on rank 0 only: the mean over the ranks counts rank 1 as zero
            parts = [inputs[k][i].double() for k in range(len(inputs)) if not (i == 2 and k == 1)]
            want = sum(parts) / len(inputs)
            assert got.dtype == inputs[0][i].dtype
            tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-6
            assert torch.allclose(got.double(), want, atol=tol, rtol=tol), f"rank {rank} tensor {i}"


def test_fsdp1_is_refused_with_the_reason():
    # FSDP1 cannot be built on a CPU-only machine; an instance made without its __init__ is enough for the check
    from torch.distributed.fsdp import FullyShardedDataParallel

    from muscle_kernels.align.distributed import check_engine

    fake = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(fake)
    check_engine(torch.nn.Sequential(torch.nn.Linear(2, 2)))  # a plain model passes
    with pytest.raises(ValueError, match="FSDP1 .* flattens the parameters"):
        check_engine(torch.nn.Sequential(torch.nn.Linear(2, 2), fake))


def test_single_process_needs_no_process_group():
    from muscle_kernels.align import distributed as D

    model = torch.nn.Linear(2, 2)
    model(torch.randn(3, 2)).sum().backward()
    assert D.context(model, list(model.parameters())) is None
