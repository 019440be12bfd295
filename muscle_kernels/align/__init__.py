"""Gradient alignment, the core algorithm of MuScleLoRA: the aligner with its gate, the record of one step, the
training step that aligns, clips and steps, and the selection of the clean reference set. It sits above the ops
(`ops/grad_align`) and the layer (`nn`), and below the integrations and the application (`integrations/`,
`defense/`, `cli`), which import it; it imports neither (docs/architecture.md)."""

from .aligner import AlignStep, GradientAligner
from .gate import BRANCHES, GateConfig
from .refset import hidden_state_features, select_kmeans, select_random, select_reference
from .step import AlignClipStep, StepRecord, build_aligner

__all__ = [
    "GradientAligner",
    "AlignStep",
    "GateConfig",
    "BRANCHES",
    "AlignClipStep",
    "StepRecord",
    "build_aligner",
    "select_reference",
    "select_random",
    "select_kmeans",
    "hidden_state_features",
]
