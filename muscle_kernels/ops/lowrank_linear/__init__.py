from .function import BACKENDS, available_backends, muscle_lora_linear, resolve_backend
from .reference import lowrank_linear_reference, make_scales, merged_delta, paper_forward

__all__ = [
    "BACKENDS", "available_backends", "muscle_lora_linear", "resolve_backend",
    "lowrank_linear_reference", "make_scales", "merged_delta", "paper_forward",
]
