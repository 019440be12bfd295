from .autoselect import auto_choices, clear_auto_choices
from .function import BACKENDS, available_backends, muscle_lora_linear, resolve_backend
from .reference import lowrank_linear_reference, make_scales, merged_delta, paper_forward

__all__ = [
    "BACKENDS",
    "auto_choices",
    "available_backends",
    "clear_auto_choices",
    "muscle_lora_linear",
    "resolve_backend",
    "lowrank_linear_reference",
    "make_scales",
    "merged_delta",
    "paper_forward",
]
