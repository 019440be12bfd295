"""Loading the classifier to defend: a Hugging Face model name or folder, or a GGUF file (decoder LLMs shipped
quantized; transformers dequantizes them on load with the `gguf` package)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

__all__ = ["classifier_factory", "split_gguf", "check_model", "ModelError"]


class ModelError(ValueError):
    """--model cannot be loaded as given; the message is one line naming it."""


def _line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _looks_local(model: str) -> bool:
    # a hub id is "name" or "org/name"; anything absolute, relative-dotted or home-based is meant as a path
    return os.path.lexists(model) or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def check_model(model: str, num_labels: int, *, gguf_file: str | None = None, new_head: bool = False) -> None:
    """What loading `model` would trip over, said in one line before anything is written or loaded: a path that
    does not exist, a folder without a config (an adapter folder, say), a file that is not GGUF, and a checkpoint
    whose classification head has another number of classes than the data (unless `new_head`)."""
    path, gguf = split_gguf(str(model), gguf_file)
    if _looks_local(str(model)):
        if not os.path.exists(os.path.expanduser(str(model))):
            raise ModelError(f"--model: {model}: no such file or folder")
        if gguf:
            _check_gguf(os.path.join(path, gguf))
        elif not os.path.isfile(os.path.join(path, "config.json")):
            adapter = os.path.isfile(os.path.join(path, "muscle_lora_config.json"))
            raise ModelError(
                f"--model: {model} has no config.json, so it is not a model folder"
                + (
                    " (it is an adapter folder: give its base model, and load the adapter onto it with load_adapter)"
                    if adapter
                    else ""
                )
            )
    if gguf:
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except OSError:
        return  # not local and not cached: from_pretrained's own message (offline, not found) is reported later
    except (ValueError, KeyError) as e:
        raise ModelError(f"--model: {model}: its config.json cannot be read ({_line(e)})") from None
    heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
    if heads and config.num_labels != num_labels and not new_head:
        raise ModelError(
            f"--num-labels: the data has {num_labels} classes, the checkpoint's classification head "
            f"({heads[0]}) has {config.num_labels}; pass --new-head to train a fresh {num_labels}-class "
            "head instead"
        )


def _check_gguf(file: str) -> None:
    """The fixed GGUF header: magic, version, tensor and metadata counts (24 bytes)."""
    try:
        with open(file, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ModelError(f"--model: cannot read {file} ({e.strerror or e})") from None
    if head[:4] != b"GGUF":
        raise ModelError(f"--model: {file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if len(head) < 24:
        raise ModelError(f"--model: {file} is a truncated GGUF file ({len(head)} bytes, shorter than its header)")


def split_gguf(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or name, GGUF file name or None): `--model path/to/model.gguf` is the same as
    `--model path/to --gguf-file model.gguf`."""
    if gguf_file is None and model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"--model: {model}: no such GGUF file")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, gguf_file


def classifier_factory(
    model: str, num_labels: int, *, gguf_file: str | None = None, quiet: bool = True, new_head: bool = False
) -> tuple[Callable, object]:
    """(a function returning a fresh sequence classifier, its tokenizer). Decoder LLMs get a padding token (their
    EOS) so that batches can be padded; a fresh classification head is expected, so its "missing weights" report is
    silenced when `quiet`. new_head: a checkpoint's own head of another size is replaced by a fresh one.
    What cannot be loaded raises ModelError (one line)."""
    import pickle
    import struct
    import warnings

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, gguf = split_gguf(str(model), gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    head = {"ignore_mismatched_sizes": True} if new_head else {}
    # a broken or hostile file fails deep inside transformers (struct.error on a truncated header, an
    # UnpicklingError when weights_only refuses a pickle): one line naming --model, not a traceback
    failures = (OSError, ValueError, KeyError, struct.error, pickle.UnpicklingError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except failures as e:
        raise ModelError(f"--model: cannot load the tokenizer of {model!r}: {_line(e)}") from None
    if tokenizer.pad_token is None:  # decoder LLMs ship without a padding token
        tokenizer.pad_token = tokenizer.eos_token

    cache = {}

    def load():
        verbosity = hf_logging.get_verbosity()
        if quiet:
            hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():  # the refusal below says it; torch's pickle-protocol note adds nothing
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **head, **extra)
        except failures as e:
            if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
                # never suggest weights_only=False: that runs whatever the pickle holds
                raise ModelError(
                    f"--model: {model!r}: its weights file is a pickle holding more than tensors, "
                    "which torch.load(weights_only=True) refuses; it is not loaded (use a safetensors "
                    "checkpoint you trust)"
                ) from None
            raise ModelError(f"--model: cannot load {model!r}: {_line(e)}") from None
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
