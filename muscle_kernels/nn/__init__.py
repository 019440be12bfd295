from .linear import MuScleLoRALinear
from .paper import PaperMultiScaleLinear
from .spec import INIT_MODES, AdapterSpec

__all__ = ["MuScleLoRALinear", "PaperMultiScaleLinear", "AdapterSpec", "INIT_MODES"]
