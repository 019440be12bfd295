"""apply_muscle_lora: put MuScleLoRA adapters into a transformers model in place (Liger-style model patching).

Matching nn.Linear modules (and GPT-2's Conv1D, converted to an nn.Linear first because it stores its weight as
[in, out]) become MuScleLoRALinear layers that reuse the original weight and bias Parameters, so loading a model with
`dtype=torch.bfloat16` or a `device_map` works unchanged: each adapter is created on its base weight's device and in
its dtype. Everything else is frozen except the config's `trainable` patterns.
"""

from __future__ import annotations

from torch import nn

from ..nn.linear import MuScleLoRALinear
from ..nn.spec import AdapterSpec
from .config import MuScleLoRAConfig
from .heads import ScoreHead, is_conv1d, linear_from_conv1d
from .patterns import resolve

__all__ = [
    "apply_muscle_lora",
    "adapter_layers",
    "trainable_parameter_summary",
    "print_trainable_parameters",
    "CONFIG_ATTR",
]

# The attribute under which the applied config lives on the model (read by save_adapter / export_peft).
CONFIG_ATTR = "muscle_lora_config"


def adapter_layers(model: nn.Module) -> dict[str, MuScleLoRALinear]:
    """{module name: layer} for every MuScleLoRALinear in `model`, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MuScleLoRALinear)}


def apply_muscle_lora(model: nn.Module, config: MuScleLoRAConfig | None = None, **overrides) -> nn.Module:
    """Swap the config's target modules for MuScleLoRALinear in place, freeze the rest, and return `model`.

    config: a MuScleLoRAConfig; None builds the paper's recipe with MuScleLoRAConfig.for_model(model, **overrides).
    overrides: single config fields to change (e.g. freq_band=[1, 2, 3], dropout=0.1).
    After the call `model.muscle_lora_config` holds the config; only the adapter factors (lora_L, lora_R) and the
    `trainable` modules have requires_grad=True. Base weights of adapter layers stay frozen in every case.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    existing = adapter_layers(model)
    if existing:
        raise RuntimeError(
            f"apply_muscle_lora: the model already has MuScleLoRA layers ({next(iter(existing))}, "
            "...); use load_adapter to load weights into it, or merge_and_unload first"
        )
    if config is None:
        config = MuScleLoRAConfig.for_model(model, **overrides)
    elif not isinstance(config, MuScleLoRAConfig):
        raise TypeError(
            f"config: expected a MuScleLoRAConfig (or None for the paper's recipe), got {type(config).__name__}"
        )
    elif overrides:
        config = MuScleLoRAConfig.from_dict({**config.to_dict(), **overrides})

    if config.score_head_hidden is not None:
        _replace_score_head(model, config)

    modules = dict(model.named_modules())
    lora_names = resolve(modules, config.lora_targets, "lora_targets") if config.lora_targets else []
    mslr_names = resolve(modules, config.mslr_targets, "mslr_targets") if config.mslr_targets else []
    both = sorted(set(lora_names) & set(mslr_names))
    if both:
        raise ValueError(f"lora_targets and mslr_targets both match {both}; a module gets one kind of adapter")
    for field, names in (("lora_targets", lora_names), ("mslr_targets", mslr_names)):
        for name in names:
            _check_target(field, name, modules[name])
    if config.modules_to_save:
        resolve(modules, config.modules_to_save, "modules_to_save")

    for p in model.parameters():
        p.requires_grad_(False)
    for names, spec in ((lora_names, config.lora_spec()), (mslr_names, config.mslr_spec())):
        for name in names:
            _swap(model, name, modules[name], spec, config.backend)
    if config.trainable:
        _set_trainable(model, config.trainable)
    setattr(model, CONFIG_ATTR, config)
    return model


def _replace_score_head(model: nn.Module, config: MuScleLoRAConfig) -> None:
    score = getattr(model, "score", None)
    if not isinstance(score, nn.Linear):
        raise ValueError(
            f"score_head_hidden: the two-layer head replaces the model's `score` nn.Linear, but "
            f"{type(model).__name__}.score is {type(score).__name__}; set score_head_hidden=None"
        )
    if score.weight.is_meta:
        raise ValueError(
            "score_head_hidden: the model's score head is on the meta device (offloaded); load the "
            "model without disk/meta offload of the head"
        )
    model.score = ScoreHead(
        score.in_features,
        score.out_features,
        inner=config.score_head_hidden,
        dropout=config.score_head_dropout,
        device=score.weight.device,
        dtype=score.weight.dtype,
    )
    model.score.train(score.training)  # a new module starts in training mode; follow the model's mode


def _check_target(field: str, name: str, module: nn.Module) -> None:
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise TypeError(
            f"{field}: {name!r} is a {type(module).__name__}; adapters go on nn.Linear (or GPT-2 "
            "Conv1D) modules -- use a more specific pattern"
        )
    if module.weight.is_meta:
        raise ValueError(
            f"{field}: {name!r} has its weight on the meta device (offloaded by device_map); "
            "MuScleLoRA needs the base weights in memory (CPU or GPU)"
        )


def _swap(model: nn.Module, name: str, module: nn.Module, spec: AdapterSpec, backend: str) -> None:
    source = "conv1d" if is_conv1d(module) else "linear"
    linear = linear_from_conv1d(module) if source == "conv1d" else module
    layer = MuScleLoRALinear.from_linear(linear, spec, backend=backend)
    layer.train(module.training)  # new modules start in training mode (adapter dropout on); follow the model's mode
    # Remember the original class so merge_and_unload can hand back a Conv1D where GPT-2 had one.
    layer.muscle_source = source
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:  # accelerate's device-alignment hook of a device_map-loaded model: keep it on the layer
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(layer, hook)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def _set_trainable(model: nn.Module, patterns) -> None:
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    layers = adapter_layers(model).values()
    # Base weights of adapter layers stay frozen (the layer freezes them: the adapter is what trains, and a frozen
    # weight spares the op its weight gradient); the adapter factors already train. A pattern that selects nothing
    # else is a mistake worth reporting.
    skip = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None}
    skip |= {id(m.lora_L) for m in layers} | {id(m.lora_R) for m in layers}
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        selected = set(resolve(names, pattern if isinstance(patterns, str) else [pattern], "trainable"))
        hits = [(n, p) for n, p in model.named_parameters() if any(q in selected for q in _prefixes(n))]
        usable = [p for _, p in hits if id(p) not in skip]
        if not usable:
            raise ValueError(
                f"trainable: {pattern!r} only selects adapter layers ({[n for n, _ in hits][:4]}), "
                "whose factors train already and whose base weights stay frozen; drop it, or drop the "
                "module from lora_targets/mslr_targets to train it in full"
            )
        for p in usable:
            p.requires_grad_(True)


def _prefixes(param_name: str):
    """The parameter's own name and the names of all modules that contain it."""
    parts = param_name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def trainable_parameter_summary(model: nn.Module) -> dict:
    """Counts of trainable / all parameters (shared tensors once), split into adapter factors and other tensors."""
    adapter_ids = set()
    for layer in adapter_layers(model).values():
        adapter_ids |= {id(layer.lora_L), id(layer.lora_R)}
    total = trainable = adapter = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            adapter += p.numel() if id(p) in adapter_ids else 0
    return dict(
        trainable=trainable,
        total=total,
        adapter=adapter,
        other_trainable=trainable - adapter,
        percent=100.0 * trainable / max(total, 1),
    )


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) PEFT's one-line summary: trainable params || all params || trainable%."""
    s = trainable_parameter_summary(model)
    line = (
        f"trainable params: {s['trainable']:,} (adapters {s['adapter']:,}, other {s['other_trainable']:,}) "
        f"|| all params: {s['total']:,} || trainable%: {s['percent']:.4f}"
    )
    print(line)
    return line
