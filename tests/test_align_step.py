"""AlignClipStep, the one training path with alignment: align, then clip, then the optimizer and scheduler step."""

import math

import pytest
import torch
import torch.nn.functional as F

from muscle_kernels.align.aligner import GradientAligner
from muscle_kernels.align.step import AlignClipStep, build_aligner
from muscle_kernels.ops.grad_align import paper_align_reference


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def batch(seed, size=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=g), torch.randint(0, 3, (size,), generator=g)


def loss_fn(model, b):
    return F.cross_entropy(model(b[0]), b[1])


def total_norm(tensors):
    return float(torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])))


class Recorder:
    """Wraps the aligner, the optimizer and the scheduler to log the order of the calls and the gradient norm each
    of them saw."""

    def __init__(self, model, update):
        self.events = []
        params = list(model.parameters())

        def log(name):
            self.events.append((name, total_norm([p.grad for p in params])))

        for name, obj in (("align", update.aligner), ("scheduler", update.scheduler)):

            def wrapped(*a, _real=obj.step, _name=name, **k):
                log(_name)
                return _real(*a, **k)

            obj.step = wrapped
        # the optimizer's own hook (replacing its step would upset the scheduler)
        update.optimizer.register_step_pre_hook(lambda *a: log("optimizer"))


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_order_is_align_clip_step(clip):
    model = tiny_model()
    params = list(model.parameters())
    ref = [batch(1)]
    aligner = GradientAligner(params, ref, loss_fn, epochs=2, min_ref_loss=0.0, backend="foreach")
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    update = AlignClipStep(params, aligner=aligner, max_grad_norm=clip, optimizer=opt, scheduler=sched)
    rec = Recorder(model, update)

    loss_fn(model, batch(2)).backward()
    raw = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    r = list(torch.autograd.grad(loss_fn(model, ref[0]), params))
    aligned, _ = paper_align_reference(raw, r, 0.0)
    aligned_norm = total_norm(aligned)
    done = update(model, epoch=0)

    assert [name for name, _ in rec.events] == ["align", "optimizer", "scheduler"]
    assert rec.events[0][1] == pytest.approx(total_norm(raw)), "the aligner must see the raw gradient"
    assert done.align.branch == "replace"
    assert done.grad_norm == pytest.approx(aligned_norm, rel=1e-5), "grad_norm is the aligned, pre-clip norm"
    want_norm = min(aligned_norm, clip) if clip > 0 else aligned_norm
    assert rec.events[1][1] == pytest.approx(want_norm, rel=1e-4), "the optimizer must see the clipped gradient"
    assert aligned_norm > 1e-3, "the test needs a gradient above the clip"
    # SGD with lr 1: the update is exactly the clipped aligned gradient
    scale = min(1.0, clip / (aligned_norm + 1e-6)) if clip > 0 else 1.0
    for i, (p, b, a) in enumerate(zip(params, before, aligned)):
        torch.testing.assert_close(
            b - p.detach(), (a * scale).float(), rtol=1e-4, atol=1e-7, msg=lambda m, i=i: f"param {i}: {m}"
        )
    assert sched.last_epoch == 1


def test_without_aligner_or_optimizer():
    model = tiny_model(1)
    params = list(model.parameters())
    loss_fn(model, batch(3)).backward()
    raw = [p.grad.clone() for p in params]
    done = AlignClipStep(params, max_grad_norm=0.0)(model, 0)  # measure only: nothing changes
    assert done.align is None and done.grad_norm == pytest.approx(total_norm(raw))
    for i, (p, g) in enumerate(zip(params, raw)):
        assert torch.equal(p.grad, g), f"param {i}: changed without clipping"
    params[0].grad = None  # a parameter without a gradient is left out, not an error
    AlignClipStep(params, max_grad_norm=1e-4)(model, 0)
    assert params[0].grad is None
    assert total_norm([p.grad for p in params[1:]]) == pytest.approx(1e-4, rel=1e-3)
    for p in params:
        p.grad = None
    assert math.isnan(AlignClipStep(params, max_grad_norm=1.0)(model, 0).grad_norm), "no gradient: the norm is NaN"


def test_errors():
    params = list(tiny_model().parameters())
    with pytest.raises(ValueError, match="max_grad_norm: expected a number >= 0"):
        AlignClipStep(params, max_grad_norm=-1.0)
    with pytest.raises(TypeError, match="aligner: expected a GradientAligner or None"):
        AlignClipStep(params, aligner=object())
    opt = torch.optim.SGD(params, lr=1.0)
    with pytest.raises(ValueError, match="scheduler: given without an optimizer"):
        AlignClipStep(params, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


@pytest.mark.parametrize("epochs,warmup,blends", [(1, 1, False), (2, 1, True), (3, 3, False), (1, 0, True)])
def test_build_aligner_fits_the_blend_schedule_to_the_run(epochs, warmup, blends):
    params = list(tiny_model().parameters())
    aligner = build_aligner(
        params, [batch(0)], loss_fn, epochs=epochs, warmup_epochs=warmup, max_raw_ratio=0.1, backend="foreach"
    )
    assert aligner.epochs == epochs and aligner.gate_config.warmup_epochs == warmup
    assert aligner.gate_config.max_raw_ratio == (0.1 if blends else 0.0)
