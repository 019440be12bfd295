"""Gradient alignment (docs/alignment.md): g <- (1 - rho) |<g, r>| / ||r||^2 r + rho g for every tensor of a list.

- function.py: the public functions (align_gradients_, grad_align_reduce, grad_align_coeffs, grad_align_apply_).
- extension.py: finds and loads the compiled csrc/ kernels (packaged in the wheel, or JIT-built and cached), with a
  warning and the fallback when there are none.
- foreach.py: the torch._foreach fallback backend (float64 sums, O(chunk) memory).
- coeffs.py: the coefficient rule shared by all backends.
- reference.py: the float64 oracle of the paper's loop (tests and benchmarks only).

Importing this package never compiles or loads anything; that happens on the first call that needs the kernels.
"""

from .function import align_gradients_, grad_align_apply_, grad_align_coeffs, grad_align_reduce
from .reference import paper_align_reference

__all__ = ["align_gradients_", "grad_align_reduce", "grad_align_coeffs", "grad_align_apply_", "paper_align_reference"]
