"""GradientAligner (the gate and schedule of docs/alignment.md) on a tiny model, and the reference-set helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muscle_kernels.align.aligner import GradientAligner
from muscle_kernels.align.refset import hidden_state_features, select_kmeans, select_random, select_reference
from muscle_kernels.ops.grad_align import paper_align_reference

from .utils import assert_close


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def make_batches(n_batches, seed, size=5):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n_batches)
    ]


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_grads(model, seed=100):
    model.zero_grad(set_to_none=True)
    loss_fn(model, make_batches(1, seed)[0]).backward()
    return [p.grad.clone() for p in model.parameters()]


def ref_grads(model, batch):
    return list(torch.autograd.grad(loss_fn(model, batch), list(model.parameters())))


def make_aligner(model, refs, **kw):
    kw.setdefault("backend", "foreach")  # the op itself is tested in test_grad_align.py; keep these fast and exact
    return GradientAligner(list(model.parameters()), refs, loss_fn, **kw)


def test_reference_gradient_does_not_touch_grad():
    model = tiny_model()
    refs = make_batches(3, seed=1)
    before = train_grads(model)
    aligner = make_aligner(model, refs, epochs=3)
    loss, got = aligner.reference_gradients(model, list(model.parameters()))
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p.grad, before[i]), f"param {i}: .grad changed by the reference gradient"
    want = ref_grads(model, refs[0])
    for i, (w, g) in enumerate(zip(want, got)):
        assert_close(f"ref grad {i}", w.double(), g)
    assert abs(loss - loss_fn(model, refs[0]).item()) < 1e-6


@pytest.mark.parametrize("backend", ["foreach", "auto"])
def test_replace_branch_matches_spec(backend):
    model = tiny_model()
    refs = make_batches(2, seed=2)
    g = train_grads(model)
    aligner = make_aligner(model, refs, epochs=4, min_ref_loss=0.0, min_ref_grad_norm=0.0, backend=backend)
    info = aligner.step(model, epoch=0)
    assert info.branch == "replace" and info.raw_ratio == 0.0
    r = ref_grads(model, refs[0])
    want, stats = paper_align_reference(g, r, 0.0)
    for i, (w, p) in enumerate(zip(want, model.parameters())):
        assert_close(f"replace: param {i}", w, p.grad)
    m = torch.stack([s[2].sqrt() for s in stats]).mean().item()
    assert abs(info.ref_grad_norm - m) <= 1e-5 * m, (info.ref_grad_norm, m)
    assert abs(info.ref_loss - loss_fn(model, refs[0]).item()) < 1e-6
    cos = stats[:, 0] / (stats[:, 1] * stats[:, 2]).sqrt()
    assert_close("cosines", cos, info.cosines.double(), atol=1e-5)
    assert info.n_tensors == 4 and info.stats.shape == (4, 3)


def test_gate_schedule_step_by_step():
    """Gate fails (reference loss below min_ref_loss): raw before warm-up, then blend with the linear ratio."""
    model = tiny_model()
    refs = make_batches(4, seed=3)
    epochs, warmup, max_rho = 5, 1, 0.1
    aligner = make_aligner(model, refs, epochs=epochs, warmup_epochs=warmup, max_raw_ratio=max_rho, min_ref_loss=1e9)
    for step, epoch in enumerate([0, 0, 1, 2, 3, 4]):
        g = train_grads(model, seed=200 + step)
        r = ref_grads(model, refs[step % len(refs)])  # batches are cycled, in order
        info = aligner.step(model, epoch)
        if epoch < warmup:
            assert info.branch == "raw" and info.raw_ratio is None, f"epoch {epoch}: {info.branch}"
            for i, (w, p) in enumerate(zip(g, model.parameters())):
                assert torch.equal(w, p.grad), f"raw branch changed param {i} at epoch {epoch}"
            continue
        rho = max_rho * (epoch - warmup) / (epochs - warmup)
        assert info.branch == "blend" and abs(info.raw_ratio - rho) < 1e-12, (epoch, info.branch, info.raw_ratio)
        want, _ = paper_align_reference(g, r, rho)
        for i, (w, p) in enumerate(zip(want, model.parameters())):
            assert_close(f"blend epoch {epoch}: param {i}", w, p.grad)


@pytest.mark.parametrize(
    "m,l,epoch,kw,want",
    [
        (1e-3, 1.0, 0, {}, ("replace", 0.0)),
        (1e-8, 1.0, 0, {}, ("raw", None)),  # norm too small, still warming up
        (1e-3, 0.1, 0, {}, ("raw", None)),  # loss too small, still warming up
        (1e-3, 0.1, 1, {}, ("blend", 0.0)),  # first blend epoch: rho = 0 by the formula
        (1e-3, 0.1, 3, {}, ("blend", 0.1 * 2 / 4)),
        (1e-8, 0.1, 5, {}, ("blend", 0.1)),  # clamped at max_raw_ratio
        (5e-7, 1.0, 2, {}, ("blend", 0.1 / 4)),  # m must be strictly above the threshold
        (1e-3, 0.4, 0, {}, ("raw", None)),  # l must be strictly above the threshold
        (1e-3, 0.1, 3, {"max_raw_ratio": 0.0, "epochs": None}, ("raw", None)),
        (1e-3, 0.0, 0, {"min_ref_loss": 0.0}, ("raw", None)),
        (1e-3, 1e-4, 0, {"min_ref_loss": 0.0}, ("replace", 0.0)),  # LLM setting
    ],
)
def test_gate_table(m, l, epoch, kw, want):
    model = tiny_model()
    args = dict(epochs=5, warmup_epochs=1, max_raw_ratio=0.1, min_ref_loss=0.4)  # the paper's encoder gate
    args.update(kw)
    aligner = make_aligner(model, make_batches(1, 0), **args)
    branch, rho = aligner.gate(m, l, epoch)
    assert branch == want[0], (m, l, epoch, branch)
    assert (rho is None) == (want[1] is None) and (rho is None or abs(rho - want[1]) < 1e-12), (rho, want)


def test_default_gate_aligns_while_the_reference_loss_is_positive():
    from muscle_kernels.align.gate import GateConfig

    gate = GateConfig()
    assert gate.min_ref_loss == 0.0 and GateConfig.paper().min_ref_loss == 0.4
    # a reference loss of 0.1 in the warm-up epoch: the paper's gate passes the raw (poisoned) gradient, ours aligns
    assert GateConfig.paper().decide(1e-3, 0.1, 0, 3) == ("raw", None)
    assert gate.decide(1e-3, 0.1, 0, 3) == ("replace", 0.0)
    assert gate.decide(1e-3, 0.0, 0, 3) == ("raw", None), "a fitted reference batch has nothing to align to"


def test_params_without_grad_are_skipped():
    model = tiny_model()
    refs = make_batches(2, seed=4)
    g = train_grads(model)
    params = list(model.parameters())
    params[1].grad = None  # e.g. a parameter unused in this step
    aligner = make_aligner(model, refs, epochs=3, min_ref_loss=0.0)
    info = aligner.step(model, 0)
    assert params[1].grad is None, "a parameter without .grad must stay without .grad"
    assert info.n_tensors == 3
    with_grad = [p for i, p in enumerate(params) if i != 1]
    r = list(torch.autograd.grad(loss_fn(model, refs[0]), with_grad))
    want, _ = paper_align_reference([x for i, x in enumerate(g) if i != 1], r, 0.0)
    for i, (w, p) in enumerate(zip(want, with_grad)):
        assert_close(f"param {i} (one skipped)", w, p.grad)
    for p in params:
        p.grad = None
    assert aligner.step(model, 0).branch == "skipped"


def test_param_unreached_by_reference_loss_keeps_grad():
    model = tiny_model()
    extra = torch.nn.Parameter(torch.randn(4))
    extra.grad = torch.randn(4)
    g_extra = extra.grad.clone()
    aligner = GradientAligner(
        [*model.parameters(), extra], make_batches(1, 5), loss_fn, epochs=3, min_ref_loss=0.0, backend="foreach"
    )
    train_grads(model)
    info = aligner.step(model, 0)
    assert torch.equal(extra.grad, g_extra), "a tensor the reference loss does not reach must keep its gradient"
    assert torch.isnan(info.stats[-1]).all() and info.branch == "replace"


def test_all_batches_mode_averages():
    model = tiny_model()
    refs = make_batches(3, seed=6)
    g = train_grads(model)
    aligner = make_aligner(model, refs, epochs=3, min_ref_loss=0.0, one_batch=False)
    info = aligner.step(model, 0)
    per_batch = [ref_grads(model, b) for b in refs]
    r = [torch.stack(ts).mean(0) for ts in zip(*per_batch)]
    want, _ = paper_align_reference(g, r, 0.0)
    for i, (w, p) in enumerate(zip(want, model.parameters())):
        assert_close(f"mean-of-batches: param {i}", w, p.grad)
    assert abs(info.ref_loss - sum(loss_fn(model, b).item() for b in refs) / 3) < 1e-6


def test_autocast_context_is_used():
    seen = []

    def recording_loss(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return loss_fn(model, batch)

    model = tiny_model()
    train_grads(model)
    aligner = GradientAligner(
        list(model.parameters()),
        make_batches(1, 7),
        recording_loss,
        epochs=2,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        backend="foreach",
    )
    aligner.step(model, 0)
    assert seen == [True]
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # without autocast=, the caller's state is inherited
        GradientAligner(list(model.parameters()), make_batches(1, 7), recording_loss, epochs=2, backend="foreach").step(
            model, 0
        )
    assert seen == [True]


def test_reference_batches_and_loss_on():
    # The public pieces the FSDP2 path (distributed.py) uses: the step's batches, and the checked loss under autocast.
    model = tiny_model()
    refs = make_batches(2, seed=3)
    seen = []

    def per_sample_loss(model, batch):  # not a scalar: refused
        seen.append(torch.is_autocast_enabled("cpu"))
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    aligner = GradientAligner(
        list(model.parameters()),
        refs,
        per_sample_loss,
        epochs=2,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )
    drawn = [aligner.reference_batches() for _ in range(3)]  # one batch per step, cycled
    assert [id(b) for (b,) in drawn] == [id(refs[0]), id(refs[1]), id(refs[0])]
    with pytest.raises(TypeError, match=r"loss_fn: must return a scalar \(0-dim\) tensor, got Tensor\(5,\)"):
        aligner.loss_on(model, refs[0])
    assert seen == [True]
    every = GradientAligner(list(model.parameters()), refs, loss_fn, epochs=2, one_batch=False)
    assert [id(b) for b in every.reference_batches()] == [id(b) for b in refs]
    assert every.loss_on(model, refs[0]).dim() == 0


def test_constructor_errors():
    model = tiny_model()
    params = list(model.parameters())
    refs = make_batches(1, 0)
    with pytest.raises(ValueError, match=r"epochs: the total number of epochs is required when max_raw_ratio > 0"):
        GradientAligner(params, refs, loss_fn)
    with pytest.raises(ValueError, match=r"epochs: must be greater than warmup_epochs"):
        GradientAligner(params, refs, loss_fn, epochs=1, warmup_epochs=1)
    with pytest.raises(TypeError, match=r"ref_batches: expected a re-iterable collection"):
        GradientAligner(params, iter(refs), loss_fn, epochs=3)
    with pytest.raises(ValueError, match=r"max_raw_ratio: expected a fraction in \[0, 1\]"):
        GradientAligner(params, refs, loss_fn, epochs=3, max_raw_ratio=2.0)
    with pytest.raises(ValueError, match=r"params: got no tensors"):
        GradientAligner([], refs, loss_fn, epochs=3)
    with pytest.raises(TypeError, match=r"loss_fn: expected a callable"):
        GradientAligner(params, refs, None, epochs=3)
    aligner = GradientAligner(params, refs, lambda m, b: m(b[0]), epochs=3)
    train_grads(model)
    with pytest.raises(TypeError, match=r"loss_fn: must return a scalar \(0-dim\) tensor"):
        aligner.step(model, 0)
    with pytest.raises(ValueError, match=r"ref_batches: is empty"):
        GradientAligner(params, [], loss_fn, epochs=3).step(model, 0)


# ---- reference set ----
def test_select_random():
    idx = select_random(50, 12, seed=3)
    assert idx.dtype == torch.int64 and idx.numel() == 12 and idx.unique().numel() == 12
    assert torch.equal(idx, idx.sort().values) and idx.min() >= 0 and idx.max() < 50
    assert torch.equal(idx, select_random(50, 12, seed=3)), "same seed, same draw"
    assert not torch.equal(idx, select_random(50, 12, seed=4))
    with pytest.raises(ValueError, match=r"k: asked for 60 reference samples but the pool has only 50"):
        select_random(50, 60)
    with pytest.raises(ValueError, match=r"k: expected a positive int"):
        select_random(50, 0)


def test_select_kmeans_picks_the_sample_nearest_each_centroid():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.5 * torch.randn(20, 2, generator=gen) for c in centers])
    idx = select_kmeans(pts, 3, seed=0)
    assert sorted((i // 20) for i in idx.tolist()) == [0, 1, 2], f"one sample per blob expected, got {idx.tolist()}"
    for i in idx.tolist():
        blob = pts[(i // 20) * 20 : (i // 20 + 1) * 20]
        mean = blob.mean(0)
        nearest = (blob - mean).norm(dim=1).argmin().item() + (i // 20) * 20
        assert i == nearest, f"index {i} is not the sample nearest to its cluster's centroid ({nearest})"
    dup = torch.cat([pts[:1].repeat(3, 1), pts[1:5]])  # identical samples: indices must still be distinct
    got = select_kmeans(dup, 5, seed=0)
    assert got.unique().numel() == 5
    with pytest.raises(ValueError, match=r"features: expected a \[num_samples, dim\] tensor"):
        select_kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match=r"method: expected 'random' or 'kmeans'"):
        select_reference(10, 2, method="fancy")
    with pytest.raises(ValueError, match=r"features: required for method='kmeans'"):
        select_reference(10, 2, method="kmeans")


def test_hidden_state_features_with_a_tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    ids = torch.randint(1, 40, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[0, 4:] = 0
    batches = [
        {"input_ids": ids[:4], "attention_mask": mask[:4], "labels": torch.zeros(4)},
        {"input_ids": ids[4:], "attention_mask": mask[4:]},
    ]
    model.train()
    feats = hidden_state_features(model, batches, pool="mean", progress=False)
    assert feats.shape == (6, 16) and model.training, "shape, and the model's mode must be restored"
    with torch.no_grad():
        h = model.eval()(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).last_hidden_state[0].mean(0)
    assert_close("masked mean of sample 0", h.double(), feats[0], atol=1e-5)
    first = hidden_state_features(model, batches, pool="first", progress=False)
    idx = select_reference(6, 3, method="kmeans", features=first)
    assert idx.numel() == 3
