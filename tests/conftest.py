"""Test-session set-up.

Without a GPU the Triton kernels run on the CPU under Triton's interpreter, which reads TRITON_INTERPRET when the
kernels are *defined*: so it is set here, before anything imports muscle_kernels' Triton module. With a GPU the
kernels compile for real and the same tests run on CUDA tensors (see tests/utils.py: DEVICE).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Offline, always: code that downloads weights at run time must fail loudly in tests, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
