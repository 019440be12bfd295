from .linear import INIT_MODES, MuScleLoRALinear
from .paper import PaperMultiScaleLinear

__all__ = ["MuScleLoRALinear", "PaperMultiScaleLinear", "INIT_MODES"]
