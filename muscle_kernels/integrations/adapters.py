"""Save, load and merge MuScleLoRA adapters.

An adapter directory holds two files:
- `muscle_lora_config.json`: the MuScleLoRAConfig plus the model class it was trained on;
- `muscle_lora_adapter.safetensors`: only the adapter factors (lora_L, lora_R, scales) of every MuScleLoRA layer,
  the other trainable tensors, and everything in `modules_to_save` (the classification head, which a pretrained
  checkpoint does not contain).
Loading checks the config, the key set and every shape, and names each mismatch.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..nn.linear import MuScleLoRALinear
from .apply import CONFIG_ATTR, adapter_layers, apply_muscle_lora
from .config import MuScleLoRAConfig
from .heads import ScoreHead, conv1d_from_linear
from .patterns import resolve

__all__ = ["save_adapter", "load_adapter", "merge_and_unload", "adapter_state_dict", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "muscle_lora_config.json"
WEIGHTS_FILE = "muscle_lora_adapter.safetensors"
_FORMAT_VERSION = 1


def _config_of(model: nn.Module, caller: str) -> MuScleLoRAConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, MuScleLoRAConfig):
        raise ValueError(f"{caller}: the model has no MuScleLoRA adapters (call apply_muscle_lora first)")
    return config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors save_adapter writes: {state-dict key: tensor} (detached, sharing storage with the model)."""
    config = _config_of(model, "adapter_state_dict")
    layers = adapter_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(f"the adapters of {merged[:3]} are merged into their base weights; unmerge() them first")
    state = model.state_dict()
    keys = set()
    for name in layers:
        keys |= {f"{name}.lora_L", f"{name}.lora_R", f"{name}.scales"}
    keys |= {n for n, p in model.named_parameters() if p.requires_grad}
    if config.modules_to_save:
        module_names = [n for n, _ in model.named_modules() if n]
        for prefix in resolve(module_names, config.modules_to_save, "modules_to_save"):
            keys |= {k for k in state if k.startswith(prefix + ".")}
    return {k: state[k] for k in state if k in keys}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter of `model` (after apply_muscle_lora) to the directory `path` (created if needed)."""
    config = _config_of(model, "save_adapter")
    tensors = adapter_state_dict(model)
    os.makedirs(path, exist_ok=True)
    from safetensors.torch import save

    from .._atomic import replace_atomically

    # clone(): safetensors refuses tensors that share storage (tied weights), and the files must not alias the model.
    data = save({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    meta = {
        "format_version": _FORMAT_VERSION,
        "model_class": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "config": config.to_dict(),
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    # Atomically, each file: a symlink planted at either name is replaced, never written through, and a reader never
    # sees half a file.
    replace_atomically(os.path.join(path, WEIGHTS_FILE), lambda f: f.write(data))
    replace_atomically(os.path.join(path, CONFIG_FILE), lambda f: f.write(text.encode("utf-8")))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by save_adapter into `model` and return it.

    A plain model (no adapters yet) gets apply_muscle_lora with the saved config first; a model that already has
    adapters must have been set up with the same config. Raises ValueError naming the file and every mismatch
    (config field, missing or unexpected tensor, shape, dtype, scales). Every check runs before the model is touched:
    a refused adapter leaves the model as it was.
    """
    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_adapter: {p} not found; is {path!r} a directory written by save_adapter?")
    meta = _read_meta(config_path)
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"load_adapter: {config_path} has format_version {meta.get('format_version')!r}, this "
            f"version of muscle_kernels reads {_FORMAT_VERSION}"
        )
    try:
        saved = MuScleLoRAConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f'load_adapter: {config_path}: its "config" is not a MuScleLoRAConfig ({_line(e)})') from None
    if meta.get("model_class") != type(model).__name__:
        raise ValueError(
            f"load_adapter: the adapter was saved from a {meta.get('model_class')}, the model is a "
            f"{type(model).__name__}"
        )
    current = getattr(model, CONFIG_ATTR, None)
    if current is not None:
        diff = current.diff(saved)
        if diff:
            lines = "; ".join(f"{k}: model has {a!r}, adapter has {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"load_adapter: the model's MuScleLoRAConfig differs from the saved one ({lines})")
    tensors = _read_weights(weights_path)
    scales = {}  # key -> the scales the config gives (never the file's: they are derived, not learned)
    if current is None:
        # The config's sizes come from a file: check them against the weights' header before anything is built,
        # then every shape the model sets, the key set, the dtypes and the values (below): a failed load must leave
        # the model untouched.
        _check_config_against_file(model, saved, weights_path, scales_out=scales)
        from ..ops.lowrank_linear.reference import make_scales

        scales = {k: make_scales(*args) for k, args in scales.items()}
        plain = model.state_dict()
        _check_tensors(
            path,
            tensors,
            {
                **{k: tuple(v.shape) for k, v in plain.items()},
                **{k: shape for k, (shape, _) in _expected_shapes(model, saved).items()},
            },
            scales,
            only_known=False,
        )
        apply_muscle_lora(model, saved)
    else:
        from ..ops.lowrank_linear.reference import make_scales

        for name, layer in adapter_layers(model).items():
            scales[f"{name}.scales"] = make_scales(layer.freq_band, layer.inner_rank, layer.alpha)
    expected = adapter_state_dict(model)
    if current is not None:
        _check_tensors(path, tensors, {k: tuple(v.shape) for k, v in expected.items()}, scales, only_known=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if problems:  # only a model that had its adapters already can get here: nothing was changed yet
        raise ValueError(f"load_adapter: {path} does not fit the model: " + " | ".join(problems))
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(scales[k] if k in scales else tensors[k])
    return model


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_meta(config_path: str) -> dict:
    """The adapter's config file as a dict with a "config" object, or a ValueError naming the file."""
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"load_adapter: {config_path}: not UTF-8 text (not a file save_adapter wrote)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"load_adapter: {config_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"load_adapter: {config_path}: not valid JSON (nested too deeply)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        got = type(meta).__name__ if not isinstance(meta, dict) else 'no "config" object'
        raise ValueError(
            f"load_adapter: {config_path}: expected a JSON object with format_version, model_class "
            f'and a "config" object, got {got}'
        )
    return meta


def _read_weights(weights_path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(weights_path)
    except Exception as e:  # safetensors' own error type is not exported under a stable name
        raise ValueError(f"load_adapter: {weights_path}: not a readable safetensors file ({_line(e)})") from None


def _check_tensors(
    path,
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, tuple],
    scales: dict[str, torch.Tensor],
    *,
    only_known: bool,
) -> None:
    """Shapes (against `shapes`; keys unknown to it are unexpected unless `only_known`), dtypes (floating point only:
    an int64 lora_R or a bool lora_L is not an adapter), finite values, and scales equal to the config's."""
    unexpected, wrong, dtypes, bad_values, bad_scales = [], [], [], [], []
    for k in sorted(tensors):
        t = tensors[k]
        if k not in shapes:
            if not only_known:
                unexpected.append(k)
            continue
        if tuple(t.shape) != shapes[k]:
            wrong.append(f"{k}: saved {tuple(t.shape)}, model {shapes[k]}")
        elif not t.is_floating_point():
            dtypes.append(f"{k} ({str(t.dtype).replace('torch.', '')})")
        elif not bool(torch.isfinite(t).all()):
            bad_values.append(k)
        elif k in scales and not torch.allclose(t.double(), scales[k].double(), rtol=1e-5, atol=0):
            bad_scales.append(k)
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    if dtypes:
        problems.append("not floating point: " + ", ".join(dtypes[:8]) + (" ..." if len(dtypes) > 8 else ""))
    if bad_values:
        problems.append(f"NaN or infinite values in {bad_values[:8]}{' ...' if len(bad_values) > 8 else ''}")
    if bad_scales:
        problems.append(
            f"scales that differ from the ones its config gives (k * alpha / r) in {bad_scales[:8]}"
            + (" ..." if len(bad_scales) > 8 else "")
        )
    if problems:
        raise ValueError(f"load_adapter: {path} does not fit the model: " + " | ".join(problems))


def _header_shapes(weights_path: str) -> dict[str, tuple]:
    """{key: shape} from a safetensors file's header (no tensor data read)."""
    from safetensors import safe_open

    try:
        with safe_open(weights_path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors' own error type is not exported under a stable name
        raise ValueError(f"load_adapter: {weights_path}: not a readable safetensors file ({_line(e)})") from None


def _expected_shapes(model: nn.Module, config: MuScleLoRAConfig, scales_out: dict | None = None) -> dict[str, tuple]:
    """{key: (shape, {axis: the config fields that set shape[axis]})} of the tensors apply_muscle_lora(model, config)
    would create, computed from the plain model's module sizes without creating anything."""
    from .heads import is_conv1d

    sizes = {}  # module name -> (in_features, out_features) after the optional score-head replacement
    set_by = {}  # module name -> {0: fields that set in_features, 1: ... out_features} where the config sets them
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            sizes[name] = (m.in_features, m.out_features)
        elif is_conv1d(m):
            sizes[name] = tuple(m.weight.shape)  # Conv1D stores [in, out]
    names = [n for n, _ in model.named_modules()]
    out = {}
    h = config.score_head_hidden
    score = getattr(model, "score", None)
    if h is not None and isinstance(score, nn.Linear):
        names = [n for n in names if n != "score" and not n.startswith("score.")]
        names += ["score", "score.dense", "score.dropout", "score.out_proj"]
        sizes.pop("score", None)
        sizes["score.dense"] = (score.in_features, h)
        sizes["score.out_proj"] = (h, score.out_features)
        set_by = {"score.dense": {1: "score_head_hidden"}, "score.out_proj": {0: "score_head_hidden"}}
        out["score.dense.weight"] = ((h, score.in_features), {0: "score_head_hidden"})
        out["score.out_proj.weight"] = ((score.out_features, h), {1: "score_head_hidden"})
    # scales as (band, inner rank, alpha): built by the caller only once the ranks are known to be the file's
    branches = []
    if config.lora_targets:
        branches.append(
            (
                resolve(names, config.lora_targets, "lora_targets"),
                config.lora_rank,
                "lora_rank",
                ((1,), config.lora_rank, config.lora_alpha),
            )
        )
    if config.mslr_targets:
        branches.append(
            (
                resolve(names, config.mslr_targets, "mslr_targets"),
                len(config.freq_band) * config.inner_rank,
                "inner_rank x len(freq_band)",
                (tuple(config.freq_band), config.inner_rank, config.mslr_alpha),
            )
        )
    for targets, nr, fields, scales in branches:
        for name in targets:
            if name not in sizes:
                continue  # not a Linear: apply_muscle_lora names the problem
            fan_in, fan_out = sizes[name]
            io = set_by.get(name, {})
            out[f"{name}.lora_L"] = ((nr, fan_in), {0: fields, **({1: io[0]} if 0 in io else {})})
            out[f"{name}.lora_R"] = ((fan_out, nr), {1: fields, **({0: io[1]} if 1 in io else {})})
            out[f"{name}.scales"] = ((nr,), {0: fields})
            if scales_out is not None:
                scales_out[f"{name}.scales"] = scales
    return out


def _check_config_against_file(
    model: nn.Module, config: MuScleLoRAConfig, weights_path: str, scales_out: dict | None = None
) -> None:
    """Every size the saved config sets (the ranks, the score head's width) must be the one the weights file holds,
    and every adapter tensor the config implies must be in it: a tampered or mismatched config (say inner_rank 1e7)
    is refused here, before apply_muscle_lora allocates it. Sizes the model sets (in/out features) are compared
    after the build, with the rest of the key set."""
    header = _header_shapes(weights_path)
    path = os.path.dirname(weights_path) or "."
    wrong, missing = [], []
    for key, (shape, config_axes) in _expected_shapes(model, config, scales_out).items():
        got = header.get(key)
        if got is None:
            if not key.endswith(".weight"):  # the head's weights are in the file only when modules_to_save says so
                missing.append(key)
            continue
        bad = [a for a in config_axes if len(got) != len(shape) or got[a] != shape[a]]
        if bad:
            fields = ", ".join(f"{config_axes[a]} = {shape[a]}" for a in bad)
            wrong.append(f"{key}: saved {got}, the config ({fields}) implies {shape}")
    if wrong:
        raise ValueError(
            f"load_adapter: the config in {path} does not match its weights file: "
            + "; ".join(wrong[:8])
            + (" ..." if len(wrong) > 8 else "")
        )
    if missing:
        missing.sort()
        raise ValueError(
            f"load_adapter: {path} does not fit the model: missing tensors "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )


@torch.no_grad()
def merge_and_unload(model: nn.Module, *, collapse_head: bool = True) -> nn.Module:
    """Fold every adapter into its base weight (W += R diag(s) L) and put plain modules back; returns `model`.

    MuScleLoRA layers become nn.Linear again (Conv1D where GPT-2 had one). With collapse_head (default), the paper's
    two-layer LLM head becomes the single bias-free `score` Linear it equals in eval mode, so the result is a
    standard transformers model that save_pretrained / from_pretrained handle. requires_grad flags are left as they
    are (base weights stay frozen).
    """
    for name, layer in adapter_layers(model).items():
        if not layer.merged:
            layer.merge()
        plain = _plain_module(layer)
        plain.train(layer.training)
        hook = getattr(layer, "_hf_hook", None)
        if hook is not None:
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(plain, hook)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    head = getattr(model, "score", None)
    if collapse_head and isinstance(head, ScoreHead):
        weight = head.collapsed_weight()
        linear = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(
            weight.to(head.out_proj.weight.dtype), requires_grad=head.out_proj.weight.requires_grad
        )
        model.score = linear.train(head.training)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def _plain_module(layer: MuScleLoRALinear) -> nn.Module:
    if getattr(layer, "muscle_source", "linear") == "conv1d":
        return conv1d_from_linear(layer.weight, layer.bias)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear
