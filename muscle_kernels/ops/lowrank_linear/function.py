"""The functional multi-scale low-rank linear op, its backends and its autograd.

    muscle_lora_linear(x, weight, bias, lora_L, lora_R, scales, *, dropout_p, training, backend) -> y

Backends:
- "reference": the pure-PyTorch oracle (reference.py), gradients by autograd; for debugging.
- "torch": a few composed GEMMs (cpu.py): addmm for the base, one addmm_ of (T s) with R^T, the backward composed the
  same way, no [M, out] temporary besides y. The path for CPU tensors.
- "cublas": the same composed GEMMs under the name they have on CUDA tensors, where each is one cuBLAS call (the
  pattern Unsloth ships); on CPU tensors it is exactly "torch".
- "triton": the fused kernels (kernels.py, launched by launch.py); for CUDA tensors (and for CPU tensors under
  TRITON_INTERPRET=1, which is how the kernels are tested without a GPU).
- "auto": on CUDA tensors with Triton usable, the faster of "triton" and "cublas", timed on first use per problem
  class and cached per process (autoselect.py; `auto_choices()` shows the decisions); "cublas" on CUDA without
  Triton; "torch" elsewhere. The environment variable MUSCLE_KERNELS_BACKEND forces what "auto" runs (e.g.
  MUSCLE_KERNELS_BACKEND=cublas, or =reference to rule every fast path out).

In eager mode the fast backends run through a plain `torch.autograd.Function`, because a `torch.library.custom_op`
call costs several times more Python dispatch (benchmarks/RESULTS.md), which would eat the adapter's whole budget on a
GPU. Under `torch.compile` the same forward/backward implementations are reached through two custom ops (forward and
backward) with fake kernels and a registered autograd formula, so a compiled model that uses the layer traces without
graph breaks; the dropout seed is then a tensor drawn inside the graph (no `.item()` in the traced code). The Triton
backends draw it on the inputs' device and read it in the mask kernel, so CUDA-graph replays get fresh masks
(`_draw_seed`). Backward saves T = drop(x) L^T ([M, n*r]) and never an [M, out] intermediate; dropout is regenerated
from the seed (composed path) or read from the packed mask that the Triton forward saved (1 bit per element of x).
"""

from __future__ import annotations

import torch

from ..._env import forced_choice
from ..._lazy import lazy_import, triton_interpreting
from . import autoselect
from .cpu import lowrank_linear_bwd_torch, lowrank_linear_fwd_torch
from .reference import lowrank_linear_reference

__all__ = ["muscle_lora_linear", "available_backends", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "reference", "torch", "cublas", "triton")
_ENV_BACKEND = "MUSCLE_KERNELS_BACKEND"


# The Triton launchers (launch.py), imported once on first use: a module global rather than functools.lru_cache,
# because dynamo traces through lru_cache wrappers with a warning when a compiled model resolves its backend.
_TRITON = {"module": None, "tried": False, "error": None}


@torch.compiler.assume_constant_result
def _triton_loaded() -> bool:
    # Dynamo cannot trace an import: when the first call that needs Triton is inside torch.compile, this runs eagerly
    # at trace time and its answer is a constant of the graph (it cannot change later in the process anyway).
    return lazy_import(_TRITON, ".launch", __package__) is not None


def _triton_launch():
    """The Triton launchers, imported once on first use; None when Triton is missing or broken (one clear reason is
    kept)."""
    return _TRITON["module"] if _triton_loaded() else None


def _interpreting() -> bool:
    return triton_interpreting()


def _triton_usable(device: torch.device) -> bool:
    if _triton_launch() is None:
        return False
    return device.type == "cuda" or _interpreting()


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on tensors of `device` in this process."""
    device = torch.device(device)
    names = ["reference", "torch", "cublas"]
    if _triton_usable(device):
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for `backend` on tensors of `device`. For "auto" on CUDA with Triton usable this is
    "auto": the choice between "triton" and "cublas" is made per problem class at the first call (autoselect.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = forced_choice(_ENV_BACKEND, BACKENDS)
        if forced:
            return resolve_backend(forced, device)
        if device.type == "cuda":
            return "auto" if _triton_usable(device) else "cublas"
        return "torch"
    if backend == "triton" and not _triton_usable(device):
        why = _TRITON["error"] or (
            f"tensors are on {device.type}; Triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
        raise RuntimeError(f"backend='triton' is not available: {why}")
    return backend


# --------------------------------------------------------------------------------------------------------------------
# Input checks: every message names the argument and what was expected.
# --------------------------------------------------------------------------------------------------------------------
def _check_inputs(x, weight, bias, lora_L, lora_R, scales, dropout_p):
    named = [("x", x), ("weight", weight), ("lora_L", lora_L), ("lora_R", lora_R), ("scales", scales)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension [..., in_features], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected last dimension {in_f} (weight's in_features), got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias: expected shape ({out_f},), got {tuple(bias.shape)}")
    if lora_L.dim() != 2 or lora_L.shape[1] != in_f:
        raise ValueError(f"lora_L: expected shape [n*r, {in_f}], got {tuple(lora_L.shape)}")
    nr = lora_L.shape[0]
    if nr < 1:
        raise ValueError("lora_L: expected at least one row (n*r >= 1), got 0")
    if tuple(lora_R.shape) != (out_f, nr):
        raise ValueError(
            f"lora_R: expected shape ({out_f}, {nr}) to match weight and lora_L, got {tuple(lora_R.shape)}"
        )
    if tuple(scales.shape) != (nr,):
        raise ValueError(f"scales: expected shape ({nr},) (one scale per row of lora_L), got {tuple(scales.shape)}")
    for name, t in named[1:]:
        if name != "scales" and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    if scales.requires_grad:
        raise ValueError("scales: expected a constant (requires_grad=False); the radial scales are not trained")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")


# --------------------------------------------------------------------------------------------------------------------
# Custom ops (forward and backward) and their autograd formula.
# --------------------------------------------------------------------------------------------------------------------
# Internal names: users choose among BACKENDS, "auto" may also pick these. Both are "triton" with dR computed inside
# another backward pass over dy, through fp32 atomics: the G shrink's ("triton-fdy") or the dx GEMM's ("triton-fdx").
_FUSED_DY = "triton-fdy"
_FOLD_DX = "triton-fdx"
# The Triton backends and the name of each one's backward in launch.py (they share the forward).
_TRITON_BWD = {
    "triton": "lowrank_linear_bwd_triton",
    _FUSED_DY: "lowrank_linear_bwd_triton_fused_dy",
    _FOLD_DX: "lowrank_linear_bwd_triton_fold_dx",
}


def _impl(backend: str):
    """(forward, backward) implementations of a concrete backend ("torch" and "cublas" share the composed GEMMs;
    the Triton variants share the forward)."""
    if _is_triton(backend):
        ops = _triton_launch()
        return ops.lowrank_linear_fwd_triton, getattr(ops, _TRITON_BWD[backend])
    return lowrank_linear_fwd_torch, lowrank_linear_bwd_torch


def _is_triton(backend: str) -> bool:
    return backend in _TRITON_BWD


def _atomic_dr_variants(x2: torch.Tensor, nr: int, dropout_p: float, needs: tuple[bool, bool, bool]) -> list[str]:
    """The Triton variants that compute dR inside another pass over dy and change something for this backward:
    "triton-fdy" where the backward reads dy once more for G, "triton-fdx" where it computes dx. Neither in
    deterministic mode, where their atomics are off and they would run (and be timed as) plain "triton"."""
    if not needs[2] or torch.are_deterministic_algorithms_enabled():
        return []
    ops = _triton_launch()
    names = [_FUSED_DY] if ops.uses_fused_dy(nr, dropout_p, x2.dtype) else []
    return names + ([_FOLD_DX] if needs[0] and ops.uses_fold_dx(nr, x2.dtype) else [])


def _choose(args: tuple, needs: tuple[bool, bool, bool], backward: bool) -> str:
    """backend="auto" on CUDA: the cached or freshly timed choice between the fused kernels (and, where they change
    anything, their variants with dR in another pass over dy) and cuBLAS."""
    x2, weight, _, lora_L = args[:4]
    key = autoselect.choice_key(x2, weight, lora_L.shape[0], args[6], backward)
    can_time = not (
        torch.compiler.is_compiling() or (x2.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    )
    names = list(autoselect.CANDIDATES)
    timing = can_time and autoselect.cached_choice(key) is None
    if timing and backward:
        names += _atomic_dr_variants(x2, lora_L.shape[0], args[6], needs)
    if timing:
        runners = autoselect.runners_for({name: _impl(name) for name in names}, args, backward, needs)
    else:
        runners = {name: None for name in names}
    with torch.no_grad():
        return autoselect.decide(key, runners, can_time=can_time, device=x2.device)


def _draw_seed(x: torch.Tensor, p: float, backend: str, compiling: bool, capturing: bool):
    """The dropout seed of one call (None / 0 without dropout), from torch's generators, so torch.manual_seed
    reproduces it and consecutive calls differ.

    Triton backends: a one-element int64 tensor drawn on x's device by that device's default generator and read by
    the mask kernel at run time, never on the host. Under CUDA-graph capture the draw is captured like any random op
    (torch takes its Philox seed and offset from the generator's graph-safe state, as for its own fused dropout), so
    each replay draws a new seed and so a new mask; no .item(), so no sync either. (Inductor seeds its Triton kernels
    the same way.) Other backends seed a private generator with a host integer drawn from the CPU generator (a
    tensor under torch.compile, read inside the custom op): a graph replay would reuse it, so they refuse capture."""
    if p <= 0.0:
        return None if compiling else 0
    if _is_triton(backend):
        return torch.randint(0, 2**31 - 1, (1,), device=x.device)
    if capturing:
        raise RuntimeError(
            f"dropout under CUDA-graph capture: backend {backend!r} seeds its mask from a host "
            "integer, which every replay would reuse; use backend='triton' (or 'auto'), or "
            "dropout_p=0 in the captured region"
        )
    seed_t = torch.randint(0, 2**31 - 1, (1,))  # traced as a graph op when compiling
    return seed_t if compiling else int(seed_t.item())


def _seed_arg(seed, backend: str):
    # Under torch.compile the seed arrives as a one-element tensor. The Triton launchers take it as it is (read on
    # the device); the composed path needs an int: .item() here runs inside the opaque custom op, at run time, so it
    # costs no graph break (and no device sync: that tensor is on the CPU).
    if seed is None:
        return 0
    if isinstance(seed, torch.Tensor):
        return seed if _is_triton(backend) else int(seed.item())
    return int(seed)


def _t_dtype(x: torch.Tensor, backend: str) -> torch.dtype:
    # The Triton kernels keep T in fp32 (it is tiny, and backward reuses it); the torch path in x's dtype.
    return torch.float32 if _is_triton(backend) else x.dtype


def _bits_shape(x2: torch.Tensor, dropout_p: float, backend: str) -> tuple:
    # The Triton forward's packed dropout mask: one bit per element of x, 32 per int32 word; empty otherwise.
    if _is_triton(backend) and dropout_p > 0.0:
        return (x2.shape[0], (x2.shape[1] + 31) // 32)
    return (0,)


@torch.library.custom_op("muscle_kernels::lowrank_linear_fwd", mutates_args=())
def _fwd_op(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_L: torch.Tensor,
    lora_R: torch.Tensor,
    scales: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd, _ = _impl(backend)
    return fwd(x2, weight, bias, lora_L, lora_R, scales, dropout_p, _seed_arg(seed, backend))


@_fwd_op.register_fake
def _(x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed, backend):
    m = x2.shape[0]
    return (
        x2.new_empty(m, weight.shape[0]),
        x2.new_empty(m, lora_L.shape[0], dtype=_t_dtype(x2, backend)),
        x2.new_empty(_bits_shape(x2, dropout_p, backend), dtype=torch.int32),
    )


@torch.library.custom_op("muscle_kernels::lowrank_linear_bwd", mutates_args=())
def _bwd_op(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    lora_L: torch.Tensor,
    lora_R: torch.Tensor,
    scales: torch.Tensor,
    t: torch.Tensor,
    bits: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
    needs_dx: bool,
    needs_dL: bool,
    needs_dR: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, bwd = _impl(backend)
    dx, dL, dR = bwd(
        dy2,
        x2,
        weight,
        lora_L,
        lora_R,
        scales,
        t,
        dropout_p,
        _seed_arg(seed, backend),
        needs_dx,
        needs_dL,
        needs_dR,
        bits,
    )
    # A custom op cannot return None: an empty tensor stands for "not needed".
    empty = x2.new_empty(0)
    return (dx if dx is not None else empty, dL if dL is not None else empty, dR if dR is not None else empty)


@_bwd_op.register_fake
def _(dy2, x2, weight, lora_L, lora_R, scales, t, bits, dropout_p, seed, backend, needs_dx, needs_dL, needs_dR):
    empty = x2.new_empty(0)
    return (
        x2.new_empty(x2.shape) if needs_dx else empty,
        lora_L.new_empty(lora_L.shape) if needs_dL else empty,
        lora_R.new_empty(lora_R.shape) if needs_dR else empty,
    )


def _setup_context(ctx, inputs, output):
    x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed, backend = inputs
    _, t, bits = output
    ctx.save_for_backward(x2, weight, lora_L, lora_R, scales, t, bits, seed)
    ctx.dropout_p, ctx.backend = dropout_p, backend
    ctx.has_bias = bias is not None


def _input_grads(bwd, need, has_bias: bool, dy2, x2, weight, lora_L, lora_R, scales, t, bits, dropout_p, seed):
    """The gradients of the forward's nine inputs (x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed,
    backend), None where `need` (ctx.needs_input_grad) says not needed: the one backward body of the custom op and
    of the eager Function. `bwd` has the signature of the backends' backward (cpu.py's lowrank_linear_bwd_torch)."""
    dy2 = dy2.contiguous()
    dx, dL, dR = bwd(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, need[0], need[3], need[4], bits)
    # The base is frozen in MuScleLoRA, but a user who unfreezes it must not get a silently missing gradient.
    dW = dy2.t().mm(x2) if need[1] else None
    db = dy2.sum(0) if (has_bias and need[2]) else None
    # The custom op returns empty tensors for the gradients not needed (it cannot return None): dropped here.
    return (dx if need[0] else None, dW, db, dL if need[3] else None, dR if need[4] else None, None, None, None, None)


def _bwd_via_op(backend: str):
    """_bwd_op with the backends' backward signature, for _input_grads."""

    def bwd(dy2, x2, weight, lora_L, lora_R, scales, t, dropout_p, seed, needs_dx, needs_dL, needs_dR, bits):
        return _bwd_op(
            dy2, x2, weight, lora_L, lora_R, scales, t, bits, dropout_p, seed, backend, needs_dx, needs_dL, needs_dR
        )

    return bwd


def _backward(ctx, dy2, _dt, _dbits):
    x2, weight, lora_L, lora_R, scales, t, bits, seed = ctx.saved_tensors
    return _input_grads(
        _bwd_via_op(ctx.backend),
        ctx.needs_input_grad,
        ctx.has_bias,
        dy2,
        x2,
        weight,
        lora_L,
        lora_R,
        scales,
        t,
        bits,
        ctx.dropout_p,
        seed,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LowRankLinearFunction(torch.autograd.Function):
    """The eager-mode twin of the custom ops above: same implementations, same saved tensors, no dispatch cost."""

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed, backend):
        fwd, _ = _impl(backend)
        y, t, bits = fwd(x2, weight, bias, lora_L, lora_R, scales, dropout_p, seed)
        ctx.save_for_backward(x2, weight, lora_L, lora_R, scales, t, bits)
        ctx.dropout_p, ctx.seed, ctx.backend, ctx.has_bias = dropout_p, seed, backend, bias is not None
        ctx.mark_non_differentiable(t, bits)
        return y, t, bits

    @staticmethod
    def backward(ctx, dy2, _dt, _dbits):
        x2, weight, lora_L, lora_R, scales, t, bits = ctx.saved_tensors
        _, bwd = _impl(ctx.backend)
        return _input_grads(
            bwd,
            ctx.needs_input_grad,
            ctx.has_bias,
            dy2,
            x2,
            weight,
            lora_L,
            lora_R,
            scales,
            t,
            bits,
            ctx.dropout_p,
            ctx.seed,
        )


# --------------------------------------------------------------------------------------------------------------------
# Public function.
# --------------------------------------------------------------------------------------------------------------------
def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def muscle_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_L: torch.Tensor,
    lora_R: torch.Tensor,
    scales: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale low-rank linear: ``y = x W^T + b + ((drop(x) L^T) * s) R^T``.

    Shapes: x ``[..., in]``, weight ``[out, in]``, bias ``[out]`` or None, lora_L ``[n*r, in]``, lora_R
    ``[out, n*r]``, scales ``[n*r]``; returns ``[..., out]``. x, weight, bias, lora_L and lora_R share one dtype
    (fp32, fp16, bf16 or fp64) and device; under autocast they are cast to the autocast dtype. Dropout (probability
    ``dropout_p``) applies to the adapter input only and only when ``training``.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    cast = _autocast_dtype(device_type)
    if cast is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
        x, weight, lora_L, lora_R = (t.to(cast) for t in (x, weight, lora_L, lora_R))
        bias = bias.to(cast) if bias is not None else None
    _check_inputs(x, weight, bias, lora_L, lora_R, scales, dropout_p)
    p = float(dropout_p) if training else 0.0
    name = resolve_backend(backend, x.device)
    if name == "reference":
        mask = None
        if p > 0.0:
            mask = torch.rand(x.shape, device=x.device) >= p
        return lowrank_linear_reference(x, weight, bias, lora_L, lora_R, scales, mask, p)
    compiling = torch.compiler.is_compiling()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # one copy at most, only for a non-contiguous x
    args = [x2, weight.contiguous(), bias, lora_L.contiguous(), lora_R.contiguous(), scales, p, None]
    capturing = not compiling and x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if name == "auto":
        if capturing and p > 0.0 and _triton_usable(x.device):
            name = "triton"  # the one graph-safe dropout (below), whatever was chosen before capture
        else:
            grad = torch.is_grad_enabled()
            needs = tuple(grad and v.requires_grad for v in (x, lora_L, lora_R))
            # Timing ignores the seed's value: 0 stands in (the real one is drawn below, once).
            name = _choose(tuple(args[:7]) + (0,), needs, any(needs) or (grad and weight.requires_grad))
    args[7] = _draw_seed(x, p, name, compiling, capturing)
    if compiling:
        y2, _, _ = _fwd_op(*args, name)
    else:
        y2, _, _ = _LowRankLinearFunction.apply(*args, name)
    return y2.reshape(*lead, weight.shape[0])
