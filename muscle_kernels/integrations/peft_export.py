"""export_peft: write a MuScleLoRA model as a standard PEFT LoRA adapter.

A MuScleLoRA layer with n branches of rank r is a LoRA of rank n*r: `delta = R diag(s) L`. PEFT computes
`lora_B(lora_A(x)) * lora_alpha / r`, so we write lora_A = L, lora_B = R diag(s) and set the module's
alpha_pattern = rank_pattern = n*r, which makes PEFT's scale exactly 1 and needs no rsLoRA or custom code. The folded
factors are written in fp32 whatever the model's dtype, so folding s adds no rounding of its own.

Modules that are not plain low-rank updates go to `modules_to_save` with their effective weights: the classification
head (always: a freshly initialised head is not in the pretrained checkpoint), other trainable modules, and any
adapter layer inside them (folded into the saved weight). The paper's two-layer LLM head is saved as the single
`score` Linear it equals in eval mode, so `PeftModel.from_pretrained(AutoModelForSequenceClassification...(...),
path)` reproduces our outputs with a stock base model.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch
from torch import nn

from ..nn.linear import MuScleLoRALinear
from .adapters import _config_of
from .apply import adapter_layers
from .heads import ScoreHead
from .patterns import resolve

__all__ = ["export_peft", "peft_state_dict"]


def _saved_modules(model: nn.Module, config) -> list:
    """Names of the modules PEFT must hold in full: modules_to_save plus the owners of trainable non-adapter tensors."""
    module_names = [n for n, _ in model.named_modules() if n]
    names = set(resolve(module_names, config.modules_to_save, "modules_to_save")) if config.modules_to_save else set()
    adapter_ids = set()
    for layer in adapter_layers(model).values():
        adapter_ids |= {id(layer.lora_L), id(layer.lora_R)}
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in adapter_ids:
            owner = pname.rpartition(".")[0]
            if not owner:
                raise ValueError(
                    f"export_peft: the trainable parameter {pname!r} belongs to the top-level model; "
                    "PEFT can only save whole submodules (modules_to_save)"
                )
            names.add(owner)
    # Keep only outermost modules: PEFT wraps each one as a whole.
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n))


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a stock copy of `module` expects: adapters folded in, the LLM head collapsed."""
    if isinstance(module, ScoreHead):
        return {"weight": module.collapsed_weight()}
    layers = {n: m for n, m in module.named_modules() if isinstance(m, MuScleLoRALinear)}
    out = {}
    for key, value in module.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)  # owner "" is the module itself
        if layer is None:
            out[key] = value
            continue
        if leaf in ("lora_L", "lora_R", "scales", "merged"):  # "merged": the flag of a merged layer
            continue
        if leaf == "weight":
            w = layer.weight.float() if layer.merged else layer.weight.float() + layer.delta_weight().float()
            if getattr(layer, "muscle_source", "linear") == "conv1d":
                w = w.t()
            out[key] = w.contiguous()
        else:
            out[key] = value
    return out


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} as export_peft writes them (keys prefixed with "base_model.model.")."""
    config = _config_of(model, "export_peft")
    saved = _saved_modules(model, config)
    tensors = {}
    for name, layer in adapter_layers(model).items():
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue  # folded into its module's saved weights
        if layer.merged:
            raise RuntimeError(
                f"export_peft: the adapter of {name!r} is merged into its base weight; unmerge() it "
                "first (or export the merged model with save_pretrained)"
            )
        s = layer.scales.float()
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_L.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (layer.lora_R.detach().float() * s).contiguous()
    for name in saved:
        for key, value in _module_state(model.get_submodule(name)).items():
            tensors[f"base_model.model.{name}.{key}"] = value.detach()
    return tensors


def export_peft(model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str = None) -> dict:
    """Write `path/adapter_config.json` and `path/adapter_model.safetensors` (a PEFT LoRA adapter); return the config.

    base_model_name_or_path: recorded in the config; defaults to model.config._name_or_path.
    """
    from safetensors.torch import save_file

    config = _config_of(model, "export_peft")
    saved = _saved_modules(model, config)
    layers = {n: m for n, m in adapter_layers(model).items() if not any(n == s or n.startswith(s + ".") for s in saved)}
    if not layers and not saved:
        raise ValueError("export_peft: nothing to export (no adapter layers and no modules to save)")
    ranks = {name: m.lora_L.shape[0] for name, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    conv = [n for n, m in layers.items() if getattr(m, "muscle_source", "linear") == "conv1d"]
    if conv and len(conv) != len(layers):
        raise ValueError(
            "export_peft: PEFT has one fan_in_fan_out flag per adapter, but this model mixes Conv1D "
            f"targets ({conv[:2]}) with nn.Linear targets; export them as separate adapters"
        )
    hf_config = getattr(model, "config", None)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(hf_config, "_name_or_path", None) or None
    is_seq_cls = type(model).__name__.endswith("ForSequenceClassification")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if is_seq_cls else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        # alpha = rank for every module: PEFT's scale alpha / r is 1, our scales live in lora_B.
        "lora_alpha": int(r),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(layers),
        "modules_to_save": saved or None,
        "lora_dropout": config.dropout,
        "fan_in_fan_out": bool(conv),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = peft_state_dict(model)
    os.makedirs(path, exist_ok=True)
    save_file(
        {k: v.to("cpu").clone().contiguous() for k, v in tensors.items()},
        os.path.join(path, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2, sort_keys=True)
    return peft_config
