"""Loading the model to defend: a GGUF file is dequantized once and handed out as independent copies."""

import pytest
import torch
import transformers

from muscle_kernels.defense import models


def test_split_gguf(tmp_path):
    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"GGUF")
    assert models.split_gguf(str(f)) == (str(tmp_path), "m.Q4.gguf")
    assert models.split_gguf("bert-base-uncased") == ("bert-base-uncased", None)
    assert models.split_gguf(str(tmp_path), "x.gguf") == (str(tmp_path), "x.gguf")
    with pytest.raises(FileNotFoundError, match="--model: .*nope.gguf: no such GGUF file"):
        models.split_gguf(str(tmp_path / "nope.gguf"))


def test_gguf_loaded_once_copies_get_fresh_heads(tmp_path, monkeypatch):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=0,
    )
    calls = []

    def fake_model(path, num_labels, **kw):
        calls.append(kw)
        return transformers.LlamaForSequenceClassification(config)

    class Tok:
        pad_token, eos_token, pad_token_id = None, "</s>", 0

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF")
    factory, tok = models.classifier_factory(str(f), 2)
    assert tok.pad_token == "</s>"
    torch.manual_seed(0)
    a = factory()
    torch.manual_seed(0)
    b = factory()
    torch.manual_seed(1)
    c = factory()
    assert len(calls) == 1 and calls[0] == {"gguf_file": "tiny.gguf"}
    assert a is not b and a.model.layers[0].self_attn.q_proj.weight is not b.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(a.score.weight, b.score.weight), "same seed, same head"
    assert not torch.equal(a.score.weight, c.score.weight), "another seed, another head"
    assert torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight), "the backbone is shared"


def test_new_head_loads_a_fresh_head(tiny_model_dir):
    from muscle_kernels.defense.models import classifier_factory

    factory, _ = classifier_factory(tiny_model_dir, 3, new_head=True)
    assert factory().config.num_labels == 3
