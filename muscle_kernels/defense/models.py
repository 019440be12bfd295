"""Loading the classifier to defend: a Hugging Face model name or folder, or a GGUF file (decoder LLMs shipped
quantized; transformers dequantizes them on load with the `gguf` package)."""
from __future__ import annotations

import copy
import os
from typing import Callable, Optional, Tuple

__all__ = ["classifier_factory", "split_gguf"]


def split_gguf(model: str, gguf_file: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(folder or name, GGUF file name or None): `--model path/to/model.gguf` is the same as
    `--model path/to --gguf-file model.gguf`."""
    if gguf_file is None and model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"--model: {model}: no such GGUF file")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, gguf_file


def classifier_factory(model: str, num_labels: int, *, gguf_file: Optional[str] = None,
                       quiet: bool = True) -> Tuple[Callable, object]:
    """(a function returning a fresh sequence classifier, its tokenizer). Decoder LLMs get a padding token (their
    EOS) so that batches can be padded; a fresh classification head is expected, so its "missing weights" report is
    silenced when `quiet`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, gguf = split_gguf(str(model), gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    if tokenizer.pad_token is None:  # decoder LLMs ship without a padding token
        tokenizer.pad_token = tokenizer.eos_token

    cache = {}

    def load():
        verbosity = hf_logging.get_verbosity()
        if quiet:
            hf_logging.set_verbosity_error()
        try:
            m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
        finally:
            hf_logging.set_verbosity(verbosity)
        if m.config.pad_token_id is None:
            m.config.pad_token_id = tokenizer.pad_token_id
        return m

    def factory():
        if not gguf:
            return load()
        # Dequantizing a GGUF file takes minutes on a CPU: do it once, hand out copies, and draw each copy's fresh
        # head from the current RNG state as from_pretrained would (same seed, same head).
        if "model" not in cache:
            with torch.random.fork_rng(devices=[]):  # loading must not move the caller's RNG: same seed, same head
                cache["model"] = load()
        m = copy.deepcopy(cache["model"])
        head = getattr(m, "score", None) or getattr(m, "classifier", None)
        std = float(getattr(m.config, "initializer_range", 0.02))
        for module in head.modules() if head is not None else ():
            if isinstance(module, torch.nn.Linear):  # the transformers init of a classification head
                torch.nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        return m

    return factory, tokenizer
