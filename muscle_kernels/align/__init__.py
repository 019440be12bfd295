"""Gradient alignment, the core algorithm of MuScleLoRA: the aligner with its gate, the record of one step, and the
selection of the clean reference set. It sits above the ops (`ops/grad_align`) and below the integrations and the
application (`integrations/`, `defense/`, `cli`), which import it; it imports neither."""
from .aligner import BRANCHES, AlignStep, GradientAligner
from .refset import hidden_state_features, select_kmeans, select_random, select_reference

__all__ = ["GradientAligner", "AlignStep", "BRANCHES", "select_reference", "select_random", "select_kmeans",
           "hidden_state_features"]
