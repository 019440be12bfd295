from .linear import INIT_MODES, MuScleLoRALinear

__all__ = ["MuScleLoRALinear", "INIT_MODES"]
