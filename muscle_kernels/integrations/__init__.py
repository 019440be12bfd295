"""Hugging Face integration: apply the paper's recipe to transformers models, save / load / merge adapters, export
them as standard PEFT LoRA adapters, and train with the transformers Trainer plus gradient alignment.

Submodules import transformers / peft only where needed; `muscle_kernels` exposes the public names lazily.
"""

from .adapters import load_adapter, merge_and_unload, save_adapter
from .apply import apply_muscle_lora, print_trainable_parameters, trainable_parameter_summary
from .config import MuScleLoRAConfig
from .peft_export import export_peft

__all__ = [
    "MuScleLoRAConfig",
    "apply_muscle_lora",
    "print_trainable_parameters",
    "trainable_parameter_summary",
    "save_adapter",
    "load_adapter",
    "merge_and_unload",
    "export_peft",
    "MuScleLoRACallback",
    "MuScleLoRATrainer",
]


def __getattr__(name):
    # The Trainer pieces import transformers.Trainer (heavy) and the aligner: load them on first use.
    if name in ("MuScleLoRACallback", "MuScleLoRATrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
