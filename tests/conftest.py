"""Test-session set-up.

Without a GPU the Triton kernels run on the CPU under Triton's interpreter, which reads TRITON_INTERPRET when the
kernels are *defined*: so it is set here, before anything imports muscle_kernels' Triton module. With a GPU the
kernels compile for real and the same tests run on CUDA tensors (see tests/utils.py: DEVICE).
"""

import os

import pytest
import torch

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
