"""Analyses from the paper: the frequency-space view of what a model has learned (SPEC section 5)."""
from .frequency import frequency_ratios, frequency_ratios_dense, low_frequency_part

__all__ = ["frequency_ratios", "frequency_ratios_dense", "low_frequency_part"]
