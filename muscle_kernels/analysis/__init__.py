"""Analyses from the paper: the frequency-space view of what a model has learned (docs/frequency.md).

FrequencyCallback (a transformers TrainerCallback) is imported on first access: the rest needs only torch."""

from .frequency import frequency_ratios, frequency_ratios_dense, low_frequency_part
from .recorder import FrequencyRecorder, Probe, mean_input_embedding, read_rows

__all__ = [
    "frequency_ratios",
    "frequency_ratios_dense",
    "low_frequency_part",
    "FrequencyRecorder",
    "Probe",
    "mean_input_embedding",
    "read_rows",
    "FrequencyCallback",
    "plot_frequency",
]


def __getattr__(name):
    if name == "FrequencyCallback":
        from .callback import FrequencyCallback

        return FrequencyCallback
    if name == "plot_frequency":
        from .plot import plot_frequency

        return plot_frequency
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
