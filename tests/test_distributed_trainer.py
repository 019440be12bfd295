"""The Trainer with MuScleLoRA on 2 CPU processes started by `accelerate launch`: once under DDP (what accelerate
runs on the CPU) and once with the model sharded by FSDP2 `fully_shard` (DTensor gradients), in one launch.

Why FSDP2 is not switched on by accelerate itself here: accelerate 1.15 sets DistributedType.FSDP only for
accelerator devices (GPU, XPU, NPU, ...); on the CPU its state stays MULTI_CPU whatever `--use_fsdp` says, and the
Trainer then trains under DDP. So the script shards the model the way accelerate's fsdp2_prepare_model does and
hands the Trainer an FSDP2-managed model (the path transformers uses for models sharded at load time). On a GPU
machine `accelerate launch --use_fsdp --fsdp_version 2` reaches the same FSDP2 model through accelerate."""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = pathlib.Path(__file__).resolve().parent / "_dist_trainer_script.py"
GA_KEYS = ("ga_ref_loss", "ga_ref_grad_norm", "ga_mean_cosine", "ga_grad_norm", "ga_replace_frac")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        MUSCLE_KERNELS_GRAD_ALIGN_BACKEND="foreach",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
        str(out),
    ]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(out), capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"accelerate launch did not finish within {e.timeout} s (a hang)") from None
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _require(runs, mode):
    reason = runs[0][mode].get("unsupported")
    if reason:
        pytest.skip(reason)


@pytest.mark.slow  # two ranks under accelerate launch
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_trainer_logs_ga_stats_once_per_step(runs, mode):
    _require(runs, mode)
    for rank, run in enumerate(runs):
        r = run[mode]
        assert r["sharded"] == [mode == "fsdp2"], f"rank {rank}: trainable parameters sharded = {r['sharded']}"
        assert r["global_step"] == 3
        assert r["ref_sampler"] == "DistributedSampler", "each rank should draw its own reference samples"
        assert [h["step"] for h in r["history"]] == [1, 2, 3], "the aligner must run once per optimizer step"
        assert len(r["logs"]) == 3
        for entry in r["logs"]:
            missing = [k for k in GA_KEYS if k not in entry]
            assert not missing, f"rank {rank} step {entry['step']}: no {missing} in the log"
            assert all(math.isfinite(entry[k]) for k in GA_KEYS)


@pytest.mark.slow  # two ranks under accelerate launch
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_trainer_ranks_take_the_same_decisions(runs, mode):
    _require(runs, mode)
    h0, h1 = runs[0][mode]["history"], runs[1][mode]["history"]
    for a, b in zip(h0, h1):
        assert a["branch"] == b["branch"] and a["ref_loss"] == b["ref_loss"], (a, b)
        assert math.isclose(a["ref_grad_norm"], b["ref_grad_norm"], rel_tol=1e-6)


@pytest.mark.slow  # two ranks under accelerate launch
def test_trainer_fsdp2_matches_ddp(runs):
    _require(runs, "fsdp2")
    # same model, data and seed: sharding the gradients must not change what the alignment does
    for a, b in zip(runs[0]["ddp"]["history"], runs[0]["fsdp2"]["history"]):
        assert a["branch"] == b["branch"]
        for key in ("ref_loss", "ref_grad_norm", "mean_cosine", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a[key], b[key])


def test_callback_refuses_deepspeed_with_the_reason():
    from types import SimpleNamespace

    import torch

    from muscle_kernels.integrations.trainer import MuScleLoRACallback

    cb = MuScleLoRACallback([{"labels": torch.zeros(1)}])
    with pytest.raises(ValueError, match="DeepSpeed keeps the gradients in its own partitioned buffers"):
        cb.on_train_begin(
            SimpleNamespace(deepspeed="ds.json", max_grad_norm=1.0),
            SimpleNamespace(),
            None,
            model=torch.nn.Linear(2, 2),
        )
