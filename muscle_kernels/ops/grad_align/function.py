"""Public gradient-alignment functions (docs/alignment.md) over lists of tensors.

    align_gradients_(grads, ref_grads, *, raw_ratio=0.0) -> stats [n, 3] fp32
    grad_align_reduce(grads, refs) -> stats [n, 3] fp32
    grad_align_coeffs(stats, raw_ratio=0.0) -> coeffs [n, 2] fp32
    grad_align_apply_(grads, refs, coeffs, *, raw_ratio=0.0) -> None

For every pair (g, r): g <- (1 - raw_ratio) * |<g, r>| / ||r||^2 * r + raw_ratio * g, in place; refs are never
written. stats[i] = (<g_i, r_i>, ||g_i||^2, ||r_i||^2) of the inputs, accumulated in fp32 or better (fp64 for fp64
tensors) and returned as fp32 on the gradients' device.

Kept tensors. A pair is left bit-for-bit unchanged when ||g||^2 or ||r||^2 is zero (docs/alignment.md), when its stats row is
not finite -- a NaN or inf anywhere in g or r shows up as a NaN/inf in that row, which is how callers detect it --
or when the coefficient overflows fp32. Other tensors are processed normally: one bad tensor never corrupts another.

Two stages. `align_gradients_` is `grad_align_reduce` -> `grad_align_coeffs` -> `grad_align_apply_` in one call
(one op, no host sync on CUDA). A sharded run (FSDP2) calls the stages itself and all-reduces (sums) the stats over
the shards in between, because <g, r>, ||g||^2 and ||r||^2 of a sharded tensor are sums over its shards.

Coefficient convention of `grad_align_apply_`:
- coeffs [n, 2] fp32: (a, b) per tensor, and g <- a * r + b * g. (0, 1) keeps g untouched (r is not read); b == 0
  overwrites g with a * r without reading g; a == 0 scales g without reading r. `grad_align_coeffs` produces them.
- coeffs [n] (any float dtype): the projection coefficients c = |<g, r>| / ||r||^2, combined with raw_ratio into
  (a, b) = ((1 - raw_ratio) * c, raw_ratio); no keep rule is applied, the caller decides.

Backends: "auto" uses the compiled extension when it has a kernel for the device (packaged in the wheel, or built
on first use: see extension.py) and the torch._foreach fallback otherwise; "extension" insists on the extension; "foreach" forces the
fallback. The environment variable MUSCLE_KERNELS_GRAD_ALIGN_BACKEND overrides "auto".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..._env import forced_choice
from . import extension
from .coeffs import grad_align_coeffs
from .foreach import align_gradients_foreach, grad_align_apply_foreach, grad_align_reduce_foreach

__all__ = [
    "align_gradients_",
    "grad_align_reduce",
    "grad_align_apply_",
    "grad_align_coeffs",
    "resolve_backend",
    "BACKENDS",
]

BACKENDS = ("auto", "extension", "foreach")
_ENV_BACKEND = "MUSCLE_KERNELS_GRAD_ALIGN_BACKEND"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_lists(
    grads, refs, name_g: str = "grads", name_r: str = "refs"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validate the pair of lists; every message names the argument and the index. Kept lean (a few attribute reads
    per tensor): it runs on every training step, over hundreds of tensors."""
    if isinstance(grads, torch.Tensor) or isinstance(refs, torch.Tensor):
        raise TypeError(f"{name_g} and {name_r}: expected lists of tensors, got a single tensor")
    grads, refs = list(grads), list(refs)
    if len(grads) != len(refs):
        raise ValueError(f"{name_g} and {name_r} must have the same length, got {len(grads)} and {len(refs)}")
    device = grads[0].device if grads and isinstance(grads[0], torch.Tensor) else None
    tensor = torch.Tensor
    for i, (g, r) in enumerate(zip(grads, refs)):
        if not (isinstance(g, tensor) and isinstance(r, tensor)):
            bad, name = (g, name_g) if not isinstance(g, tensor) else (r, name_r)
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(bad).__name__}")
        g_dtype, g_device = g.dtype, g.device
        if g_dtype is not r.dtype or g_dtype not in _DTYPES:
            if g_dtype not in _DTYPES:
                raise TypeError(
                    f"{name_g}[{i}]: dtype {g_dtype} is not supported; expected float32, float16, bfloat16 or float64"
                )
            raise TypeError(f"{name_r}[{i}] has dtype {r.dtype} but {name_g}[{i}] has dtype {g_dtype}")
        if g.shape != r.shape:
            raise ValueError(f"{name_r}[{i}] has shape {tuple(r.shape)} but {name_g}[{i}] has shape {tuple(g.shape)}")
        if g_device != device or r.device != device:
            if r.device != g_device:
                raise ValueError(f"{name_r}[{i}] is on {r.device} but {name_g}[{i}] is on {g_device}")
            raise ValueError(f"{name_g}[{i}] is on {g_device} but {name_g}[0] is on {device}; one device per call")
    return grads, refs


def _check_writable(grads: list[torch.Tensor], name: str, refs: list[torch.Tensor], name_r: str = "refs") -> None:
    """The in-place stages write grads, so one rule holds on every backend (they used to differ):
    - a tensor that requires grad (a parameter itself, say) is refused, instead of being overwritten behind
      autograd's back by the kernels (the fallback would raise);
    - an inference tensor (made under torch.inference_mode()) is refused outside inference mode, as torch refuses
      any in-place update of one (the kernels would write it anyway);
    - a gradient whose memory overlaps another gradient or any reference (the same tensor passed twice, or views
      of one) is refused: the result would depend on the order the backend reads and writes in."""
    inference_ok = torch.is_inference_mode_enabled()
    for i, g in enumerate(grads):
        if g.requires_grad:
            what = "a leaf tensor, e.g. a parameter" if g.is_leaf else "part of an autograd graph"
            raise ValueError(
                f"{name}[{i}] requires grad ({what}); {name} is written in place: pass the gradients "
                "(p.grad), or detach() them"
            )
        if g.is_inference() and not inference_ok:
            raise ValueError(
                f"{name}[{i}] is an inference tensor (made under torch.inference_mode()); {name} is "
                "written in place, which torch allows only inside inference mode: call there, or "
                "clone() it"
            )
    _check_no_overlap(grads, name, refs, name_r)


def _check_no_overlap(grads, name, refs, name_r) -> None:
    spans = []  # (storage, first byte, end byte, label, is a gradient)
    for label, tensors, is_grad in ((name, grads, True), (name_r, refs, False)):
        for i, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            size = t.element_size()
            first = t.storage_offset() * size
            last = first + size * (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())))
            spans.append((t.untyped_storage().data_ptr(), first, last, f"{label}[{i}]", is_grad))
    spans.sort(key=lambda s: (s[0], s[1]))
    # one sweep per storage: a span overlaps an earlier one when it starts before the furthest end seen so far
    # (of any tensor, for a gradient; of a gradient, for a reference: references may share memory among themselves)
    storage, reach_any, reach_grad = None, (-1, ""), (-1, "")
    for ptr, first, last, label, is_grad in spans:
        if ptr != storage:
            storage, reach_any, reach_grad = ptr, (-1, ""), (-1, "")
        other = reach_any if is_grad else reach_grad
        if first < other[0]:
            raise ValueError(
                f"{other[1]} and {label} share memory; {name} is written in place, so no gradient may "
                "alias another gradient or a reference (pass separate tensors, e.g. clone() one)"
            )
        if last > reach_any[0]:
            reach_any = (last, label)
        if is_grad and last > reach_grad[0]:
            reach_grad = (last, label)


def resolve_backend(backend: str, device: torch.device, op: str = "grad_align_fused") -> str:
    """'extension' or 'foreach' for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = forced_choice(_ENV_BACKEND, BACKENDS)
        if forced:
            return resolve_backend(forced, device, op)
        extension.load_extension()
        return "extension" if extension.has_kernel(op, device.type) else "foreach"
    if backend == "extension":
        info = extension.load_extension()
        if info is None:
            why = extension.extension_info("none")["reason"] or "not built"
            raise RuntimeError(f"backend='extension' is not available: {why}")
        if not extension.has_kernel(op, device.type):
            why = f": {info.cuda_reason}" if device.type == "cuda" and info.cuda_reason else ""
            raise RuntimeError(
                f"backend='extension': the extension has no {device.type} kernel "
                f"(kernels: {', '.join(info.kernels) or 'none'}){why}"
            )
    return backend


class _Contiguous:
    """Contiguous stand-ins for non-contiguous gradients (the kernels need flat memory); copied back on exit."""

    def __init__(self, grads: list[torch.Tensor], refs: list[torch.Tensor]):
        self.orig = grads
        self.grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        self.refs = [r.contiguous() for r in refs]

    def write_back(self):
        for orig, work in zip(self.orig, self.grads):
            if work is not orig:
                orig.copy_(work)


def align_gradients_(
    grads: Sequence[torch.Tensor], ref_grads: Sequence[torch.Tensor], *, raw_ratio: float = 0.0, backend: str = "auto"
) -> torch.Tensor:
    """Align every gradient with its reference gradient, in place (docs/alignment.md).

    Args:
        grads: tensors g_i (e.g. `p.grad` of the trainable parameters), modified in place. Any mix of shapes
            (empty tensors too) and of float32/float16/bfloat16/float64, all on one device.
        ref_grads: reference gradients r_i, same shape/dtype/device as grads[i]; not modified.
        raw_ratio: rho in [0, 1]: 0 replaces g by its projection c * r, otherwise the result is blended
            (1 - rho) * c * r + rho * g.
        backend: "auto" | "extension" | "foreach" (see the module docstring).

    Returns:
        stats [n, 3] fp32 on the gradients' device: (<g, r>, ||g||^2, ||r||^2) before alignment. A row with a NaN/inf
        marks a tensor that had a non-finite value and was left unchanged; zero in column 1 or 2 marks a tensor left
        unchanged because g or r was zero.
    """
    grads, refs = _check_lists(grads, ref_grads, "grads", "ref_grads")
    _check_writable(grads, "grads", refs, "ref_grads")
    raw_ratio = float(raw_ratio)
    if not 0.0 <= raw_ratio <= 1.0:
        raise ValueError(f"raw_ratio: expected a number in [0, 1], got {raw_ratio}")
    if not grads:
        return torch.zeros(0, 3, dtype=torch.float32)
    work = _Contiguous(grads, refs)
    if resolve_backend(backend, grads[0].device) == "extension":
        stats = torch.ops.muscle_kernels.grad_align_fused(work.grads, work.refs, raw_ratio)
    else:
        stats = align_gradients_foreach(work.grads, work.refs, raw_ratio)
    work.write_back()
    return stats


def grad_align_reduce(
    grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], *, backend: str = "auto"
) -> torch.Tensor:
    """Stage 1: stats [n, 3] fp32 = (<g_i, r_i>, ||g_i||^2, ||r_i||^2), one pass over g and r, nothing written.

    Under FSDP2 all-reduce (sum) the result over the shards before `grad_align_coeffs`.
    """
    grads, refs = _check_lists(grads, refs)
    if not grads:
        return torch.zeros(0, 3, dtype=torch.float32)
    grads = [g.contiguous() for g in grads]
    refs = [r.contiguous() for r in refs]
    if resolve_backend(backend, grads[0].device, "grad_align_reduce") == "extension":
        return torch.ops.muscle_kernels.grad_align_reduce(grads, refs)
    return grad_align_reduce_foreach(grads, refs)


def grad_align_apply_(
    grads: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    *,
    raw_ratio: float = 0.0,
    backend: str = "auto",
) -> None:
    """Stage 2: g_i <- a_i * r_i + b_i * g_i in place (see the module docstring for the two coeffs forms).

    Args:
        coeffs: [n, 2] fp32 (a, b) per tensor -- as made by `grad_align_coeffs(stats, raw_ratio)` -- or [n]
            projection coefficients c_i, turned into (a, b) = ((1 - raw_ratio) * c_i, raw_ratio).
        raw_ratio: only used with [n] coeffs; must be 0 with [n, 2] coeffs (the ratio is already inside).
    """
    grads, refs = _check_lists(grads, refs)
    _check_writable(grads, "grads", refs)
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"coeffs: expected a tensor, got {type(coeffs).__name__}")
    n = len(grads)
    raw_ratio = float(raw_ratio)
    if not 0.0 <= raw_ratio <= 1.0:
        raise ValueError(f"raw_ratio: expected a number in [0, 1], got {raw_ratio}")
    if not coeffs.is_floating_point():
        raise TypeError(f"coeffs: expected a floating-point tensor, got {coeffs.dtype}")
    if coeffs.shape == (n,):
        c = coeffs.detach().double()
        coeffs = torch.stack([((1.0 - raw_ratio) * c).float(), torch.full_like(c, raw_ratio).float()], dim=1)
    elif coeffs.shape == (n, 2):
        if raw_ratio != 0.0:
            raise ValueError("raw_ratio: must be 0 with [n, 2] coeffs (b already is the raw ratio)")
        coeffs = coeffs.detach().float()
    else:
        raise ValueError(f"coeffs: expected shape [{n}] or [{n}, 2] for {n} tensors, got {tuple(coeffs.shape)}")
    if not grads:
        return
    if coeffs.device != grads[0].device:
        raise ValueError(f"coeffs is on {coeffs.device} but the gradients are on {grads[0].device}")
    coeffs = coeffs.contiguous()
    work = _Contiguous(grads, refs)
    if resolve_backend(backend, grads[0].device, "grad_align_apply") == "extension":
        torch.ops.muscle_kernels.grad_align_apply(work.grads, work.refs, coeffs)
    else:
        grad_align_apply_foreach(work.grads, work.refs, coeffs)
    work.write_back()
