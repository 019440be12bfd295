"""Gradient alignment (SPEC section 3): g <- (1 - rho) |<g, r>| / ||r||^2 r + rho g for every tensor of a list.

- function.py: the public functions (align_gradients_, grad_align_reduce, grad_align_coeffs, grad_align_apply_).
- extension.py: JIT build + load of the csrc/ C++ (CPU) and CUDA kernels, with a warning and fallback on failure.
- reference.py: the float64 oracle of the paper's loop and the torch._foreach fallback.

Importing this package never compiles anything; the extension is built on the first call that needs it.
"""
from .function import align_gradients_, grad_align_apply_, grad_align_coeffs, grad_align_reduce
from .reference import paper_align_reference

__all__ = ["align_gradients_", "grad_align_reduce", "grad_align_coeffs", "grad_align_apply_", "paper_align_reference"]
