"""Test-session set-up.

Without a GPU the Triton kernels run on the CPU under Triton's interpreter, which reads TRITON_INTERPRET when the
kernels are *defined*: so it is set here, before anything imports muscle_kernels' Triton module. With a GPU the
kernels compile for real and the same tests run on CUDA tensors (see tests/utils.py: DEVICE).
"""

import os

import pytest
import torch

from .utils import WORDS, stub_record

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Offline, always: code that downloads weights at run time must fail loudly in tests, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """`tiny_bert_dir(words)`: the folder of a tiny BERT over `words` (tests/tiny_models.py: save_tiny_bert), built
    once per session and word list: several CLI tests load a `--model` folder and none of them writes to it."""
    from tiny_models import save_tiny_bert

    built = {}

    def folder(words):
        key = tuple(words)
        if key not in built:
            built[key] = save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), key)
        return built[key]

    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_bert_dir):
    """A tokenizer over WORDS (tests/utils.py) and a random 1-layer BERT (hidden 32) saved to a folder, as `--model`
    takes it. Shared by the CLI tests (test_cli_errors, test_output_folder, test_divergence, ...)."""
    return tiny_bert_dir(WORDS)


@pytest.fixture
def stub_training(monkeypatch):
    """train_method replaced by a stub that writes a fake adapter folder; `interrupt_at` raises Ctrl-C there."""
    import muscle_kernels.defense.train as train

    calls = []
    state = dict(interrupt_at=None)

    def fake(method, factory, tokenizer, splits, settings, *, output_dir=None, progress=True, log=print, on_step=None):
        calls.append(method)
        if state["interrupt_at"] == len(calls):
            raise KeyboardInterrupt
        record = stub_record(method, settings)
        if output_dir is not None:
            os.makedirs(os.path.join(output_dir, method))
            with open(os.path.join(output_dir, method, "adapter.txt"), "w") as f:
                f.write("new")
            record["saved_to"] = os.path.join(output_dir, method)
        return record

    monkeypatch.setattr(train, "train_method", fake)
    state["calls"] = calls
    return state


@pytest.fixture
def no_minilm(monkeypatch):
    """analyze must refuse before the model loads: loading it fails the test."""
    import muscle_kernels.defense.demo as demo

    def boom(*a, **k):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(demo, "minilm_factory", boom)
