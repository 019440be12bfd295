"""muscle_kernels: fast MuScleLoRA (Wu et al., ACL 2024) for backdoor-robust fine-tuning.

Core (imported eagerly, light): the layer and its functional op. Everything that pulls in heavier dependencies
(transformers, the C++/CUDA extension, the defended training loop) is imported on first attribute access, so
`import muscle_kernels` stays fast and never fails because an optional piece cannot be built.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from .nn import AdapterSpec, MuScleLoRALinear
from .ops.lowrank_linear import available_backends, muscle_lora_linear


def _version() -> str:
    # pyproject.toml holds the one version; an install records it in the package's metadata. A source tree put on
    # sys.path without installing it has no metadata: "0+unknown" says so rather than repeat a number that drifts.
    try:
        return importlib.metadata.version("muscle_kernels")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

# public name -> module that defines it (imported lazily)
_LAZY = {
    "align_gradients_": "muscle_kernels.ops.grad_align",
    "grad_align_reduce": "muscle_kernels.ops.grad_align",
    "grad_align_coeffs": "muscle_kernels.ops.grad_align",
    "grad_align_apply_": "muscle_kernels.ops.grad_align",
    "extension_info": "muscle_kernels.ops.grad_align.extension",
    "info": "muscle_kernels.info",
    "GradientAligner": "muscle_kernels.align.aligner",
    "AlignStep": "muscle_kernels.align.aligner",
    "GateConfig": "muscle_kernels.align.gate",
    "AlignClipStep": "muscle_kernels.align.step",
    "MuScleLoRAConfig": "muscle_kernels.integrations.config",
    "apply_muscle_lora": "muscle_kernels.integrations.apply",
    "save_adapter": "muscle_kernels.integrations.adapters",
    "load_adapter": "muscle_kernels.integrations.adapters",
    "merge_and_unload": "muscle_kernels.integrations.adapters",
    "export_peft": "muscle_kernels.integrations.peft_export",
    "MuScleLoRACallback": "muscle_kernels.integrations.trainer",
    "MuScleLoRATrainer": "muscle_kernels.integrations.trainer",
    "print_trainable_parameters": "muscle_kernels.integrations.apply",
    "trainable_parameter_summary": "muscle_kernels.integrations.apply",
}

__all__ = ["MuScleLoRALinear", "AdapterSpec", "muscle_lora_linear", "available_backends", "__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'muscle_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
