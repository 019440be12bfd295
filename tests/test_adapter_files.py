"""The adapter files of save_adapter / load_adapter (muscle_lora_config.json, muscle_lora_adapter.safetensors):
load_adapter checks the config against the weights file's header before it allocates anything, checks everything
before it touches the model, and names the file at fault; save_adapter replaces planted links instead of following
them and gives its files the modes the umask asks for.

The memory cases run in a subprocess under an address-space limit (tests/utils.py: run_limited), so that a regression
fails the test instead of taking the machine down. "The issue" in a test below is issue 15 (hardening)."""

import json
import os

import pytest
import torch
import transformers

from .tiny_models import saved_adapter, tiny_bert
from .utils import run_limited


# -- sizes in the config checked against the weights file's header before anything is allocated ------------------------
def test_adapter_config_checked_against_header(tmp_path):
    """inner_rank 1e7 or lora_rank 1e9 in a tampered config: refused before apply_muscle_lora allocates 10-128 GB
    (both cases in one subprocess: it is one row of the issue, and the interpreter start is the cost)."""
    p = run_limited(f"""
        import json, os, sys
        import transformers
        from muscle_kernels import apply_muscle_lora, load_adapter, save_adapter
        config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32)
        path = {str(tmp_path / "adapter")!r}
        save_adapter(apply_muscle_lora(transformers.BertForSequenceClassification(config)), path)
        meta_path = os.path.join(path, "muscle_lora_config.json")
        good = json.load(open(meta_path))
        for field, value in (("inner_rank", 10**7), ("lora_rank", 10**9)):
            meta = json.loads(json.dumps(good))
            meta["config"][field] = value
            json.dump(meta, open(meta_path, "w"))
            try:
                load_adapter(transformers.BertForSequenceClassification(config), path)
            except ValueError as e:
                print(field, "->", e)
            else:
                sys.exit(field + ": loaded")
    """)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 2, p.stdout
    for line, field in zip(lines, ("inner_rank", "lora_rank")):
        assert line.startswith(field + " -> ") and "does not match its weights file" in line
        assert f"({field}" in line or f"x {field}" in line or f"{field} x" in line, line


def test_score_head_hidden_checked_against_header(tmp_path):
    from muscle_kernels import apply_muscle_lora, load_adapter, save_adapter

    config = transformers.LlamaConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        pad_token_id=0,
        num_labels=2,
    )
    save_adapter(apply_muscle_lora(transformers.LlamaForSequenceClassification(config)), tmp_path)
    meta = json.loads((tmp_path / "muscle_lora_config.json").read_text())
    meta["config"]["score_head_hidden"] = 10**6
    (tmp_path / "muscle_lora_config.json").write_text(json.dumps(meta))
    fresh = transformers.LlamaForSequenceClassification(config)
    with pytest.raises(
        ValueError,
        match=r"score.dense.lora_R: saved \(16, 4\), the config \(score_head_hidden = "
        r"1000000\) implies \(1000000, 4\)",
    ):
        load_adapter(fresh, tmp_path)
    assert isinstance(fresh.score, torch.nn.Linear), "nothing may be built before the check"


# -- load_adapter checks everything before it touches the model, and names the file ------------------------------------
def untouched(model, before):
    from muscle_kernels.integrations.apply import adapter_layers

    return (
        not hasattr(model, "muscle_lora_config")
        and not adapter_layers(model)
        and sum(p.requires_grad for p in model.parameters()) == before
    )


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    from muscle_kernels import load_adapter

    path = saved_adapter(tmp_path, hidden=48)
    model = tiny_bert(32)
    before = sum(p.requires_grad for p in model.parameters())
    with pytest.raises(
        ValueError,
        match=r"does not fit the model: .*shape mismatch: .*saved \(4, 48\), model "
        r"\(4, 32\)",
    ):
        load_adapter(model, path)
    assert untouched(model, before)


def tamper(path, key, change):
    from safetensors.torch import load_file, save_file

    f = path / "muscle_lora_adapter.safetensors"
    tensors = load_file(f)
    tensors[key] = change(tensors[key])
    save_file(tensors, f)


@pytest.mark.parametrize(
    "key, change, match",
    [
        ("classifier.lora_R", lambda t: t.to(torch.int64), r"not floating point: classifier.lora_R \(int64\)"),
        ("classifier.lora_L", lambda t: t > 0, r"not floating point: classifier.lora_L \(bool\)"),
        ("classifier.scales", lambda t: t * 1000, r"scales that differ from the ones its config gives .*classifier"),
        ("classifier.scales", lambda t: t * float("nan"), r"NaN or infinite values in \['classifier.scales'\]"),
        ("classifier.lora_L", lambda t: t * float("inf"), r"NaN or infinite values in \['classifier.lora_L'\]"),
    ],
)
def test_adapter_dtypes_values_and_scales(tmp_path, key, change, match):
    from muscle_kernels import apply_muscle_lora, load_adapter

    path = saved_adapter(tmp_path)
    tamper(path, key, change)
    model = tiny_bert()
    before = sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)
    assert untouched(model, before)
    with pytest.raises(ValueError, match=match):  # a model that has its adapters already: the same checks
        load_adapter(apply_muscle_lora(tiny_bert()), path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[1, 2]", r"expected a JSON object with format_version, model_class and a \"config\" object, got list"),
        (
            '{"format_version": 1, "model_class": "BertForSequenceClassification"}',
            r"expected a JSON object .* got no \"config\" object",
        ),
        ("{not json", r"not valid JSON \(Expecting property name"),
        (
            '{"format_version": 1, "model_class": "BertForSequenceClassification", "config": {"bogus": 1}}',
            r"its \"config\" is not a MuScleLoRAConfig \(MuScleLoRAConfig: unknown field",
        ),
    ],
)
def test_adapter_config_file_errors_name_the_file(tmp_path, text, match):
    from muscle_kernels import load_adapter

    path = saved_adapter(tmp_path)
    (path / "muscle_lora_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"load_adapter: .*muscle_lora_config.json: " + match):
        load_adapter(tiny_bert(), path)


def test_corrupt_weights_file_is_named(tmp_path):
    from muscle_kernels import load_adapter

    path = saved_adapter(tmp_path)
    f = path / "muscle_lora_adapter.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(
        ValueError,
        match=r"load_adapter: .*muscle_lora_adapter.safetensors: not a readable "
        r"safetensors file",
    ):
        load_adapter(tiny_bert(), path)


# -- save_adapter: planted links replaced, not followed; file modes follow the umask -----------------------------------
def test_save_adapter_replaces_planted_links(tmp_path):
    from muscle_kernels import apply_muscle_lora, load_adapter, save_adapter

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.json"
    victim.write_text("precious")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "muscle_lora_config.json").symlink_to("../outside/victim.json")
    (adapter / "muscle_lora_adapter.safetensors").symlink_to("../outside/victim.json")
    save_adapter(apply_muscle_lora(tiny_bert()), adapter)
    assert victim.read_text() == "precious"
    assert not any(os.path.islink(adapter / n) for n in os.listdir(adapter))
    load_adapter(tiny_bert(), adapter)  # whole files


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_adapter_files_follow_the_umask(tmp_path, umask, mode):
    from muscle_kernels import apply_muscle_lora, save_adapter

    old = os.umask(umask)
    try:
        save_adapter(apply_muscle_lora(tiny_bert()), tmp_path / "a")
    finally:
        os.umask(old)
    for name in ("muscle_lora_config.json", "muscle_lora_adapter.safetensors"):
        assert oct((tmp_path / "a" / name).stat().st_mode & 0o777) == oct(mode), name
