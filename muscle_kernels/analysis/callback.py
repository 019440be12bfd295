"""The frequency recorder as a transformers TrainerCallback (imports transformers; analysis/recorder.py does not).

    from muscle_kernels.analysis import FrequencyRecorder, FrequencyCallback
    trainer = Trainer(..., callbacks=[FrequencyCallback(FrequencyRecorder("frequency.csv", probes), method="lora")])

Records before the first step (step 0) and after every `recorder.every`-th optimizer step (Trainer's global_step),
on the main process only.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .recorder import FrequencyRecorder

__all__ = ["FrequencyCallback"]


class FrequencyCallback(TrainerCallback):
    def __init__(self, recorder: FrequencyRecorder, method: str | None = None):
        if not isinstance(recorder, FrequencyRecorder):
            raise TypeError(f"recorder: expected a FrequencyRecorder, got {type(recorder).__name__}")
        self.recorder = recorder
        self.method = method

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.recorder.record(state.global_step, model, method=self.method)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.recorder(state.global_step, model, method=self.method)
