"""Gradient alignment inside the transformers Trainer: once per optimizer step, before clipping, only adapters train."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from muscle_kernels import MuScleLoRACallback, apply_muscle_lora  # noqa: E402
from muscle_kernels.align.aligner import GradientAligner  # noqa: E402
from muscle_kernels.integrations.trainer import MuScleLoRATrainer  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, LABELS = 60, 3


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return apply_muscle_lora(transformers.BertForSequenceClassification(config))


def samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        dict(
            input_ids=torch.randint(2, VOCAB, (8,), generator=g),
            attention_mask=torch.ones(8, dtype=torch.long),
            labels=torch.randint(0, LABELS, (), generator=g),
        )
        for _ in range(n)
    ]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=5e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def grad_norm(model):
    return float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    )


class Probe(TrainerCallback):
    """Records the gradients at on_pre_optimizer_step (placed before or after MuScleLoRACallback)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def test_aligns_once_per_optimizer_step_before_clipping(tmp_path, monkeypatch):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    seen = []  # (global step at the call, raw grad norm the aligner saw)
    real_step = GradientAligner.step

    def spy(self, m, epoch):
        seen.append(grad_norm(m))
        return real_step(self, m, epoch)

    monkeypatch.setattr(GradientAligner, "step", spy)
    ga = MuScleLoRACallback([collate(samples(4, 9))], max_grad_norm=1e-3, backend="foreach")
    after = Probe()
    trainer = Trainer(
        model=model,
        args=args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=samples(16, 1),
        data_collator=collate,
        callbacks=[ga, after],
    )
    trainer.train()
    # 16 samples / batch 4 / accumulation 2 = 2 optimizer steps per epoch, 2 epochs.
    assert trainer.state.global_step == 4
    assert len(seen) == 4, f"aligner ran {len(seen)} times for 4 optimizer steps"
    assert [r["epoch"] for r in ga.history] == [0, 0, 1, 1]
    assert all(s > 1e-3 for s in seen), f"the aligner must see unclipped gradients, saw norms {seen}"
    for i, grads in enumerate(after.grads):
        total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
        assert total <= 1e-3 * (1 + 1e-4), f"step {i}: gradient norm {total:.3e} after the callback, clip is 1e-3"
    assert trainer.args.max_grad_norm == 1.0, "the Trainer's clip setting must be restored after training"
    # Only the adapter factors moved.
    state = model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    assert any(k.endswith("lora_R") for k in changed)
    # Stats reach the Trainer's log.
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all("ga_ref_loss" in e and "ga_replace_frac" in e for e in logged)


def test_gradient_is_the_clipped_projection_on_the_reference(tmp_path):
    model = tiny_bert(seed=3)
    ref_batch = collate(samples(4, 7))
    before, after = Probe(), Probe()
    ga = MuScleLoRACallback([ref_batch], max_grad_norm=0.05, min_ref_loss=0.0, backend="foreach")
    trainer = Trainer(
        model=model,
        args=args(tmp_path, num_train_epochs=1, max_steps=1),
        train_dataset=samples(4, 2),
        data_collator=collate,
        callbacks=[before, ga, after],
    )
    start = copy.deepcopy(model)
    trainer.train()
    assert ga.history[0]["branch"] == "replace"
    # The reference gradient, computed by hand on the starting weights (no dropout in this model).
    start.train()
    params = [p for p in start.parameters() if p.requires_grad]
    names = [n for n, p in start.named_parameters() if p.requires_grad]
    refs = dict(zip(names, torch.autograd.grad(start(**ref_batch).loss, params, allow_unused=True)))
    raw, final = before.grads[0], after.grads[0]
    aligned = {}
    for n, g in raw.items():
        r = refs[n]
        if r is None or r.norm() == 0 or g.norm() == 0:
            aligned[n] = g
        else:
            aligned[n] = (g * r).sum().abs() / (r * r).sum() * r
    total = torch.linalg.vector_norm(torch.stack([a.norm() for a in aligned.values()]))
    clip = min(1.0, 0.05 / (float(total) + 1e-6))
    for n in raw:
        torch.testing.assert_close(
            final[n],
            aligned[n] * clip,
            rtol=1e-4,
            atol=1e-7,
            msg=lambda m, n=n: f"{n}: gradient after the callback: {m}",
        )


def test_trainer_subclass_bf16_logs_stats(tmp_path):
    model = tiny_bert(seed=1)
    before = copy.deepcopy(model.state_dict())
    trainer = MuScleLoRATrainer(
        model=model,
        args=args(tmp_path, bf16=True, num_train_epochs=1),
        train_dataset=samples(12, 4),
        data_collator=collate,
        ref_dataset=samples(8, 5),
        aligner_kwargs=dict(backend="foreach"),
    )
    trainer.train()
    history = trainer.muscle_callback.history
    assert len(history) == trainer.state.global_step == 3
    for r in history:
        assert r["branch"] in ("replace", "raw") and r["ref_loss"] == r["ref_loss"], f"bad record {r}"
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3 and all(e["ga_ref_loss"] > 0 for e in logged)
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    assert changed and changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"


def test_callback_errors():
    with pytest.raises(ValueError, match="pass ref_batches"):
        MuScleLoRACallback()
    with pytest.raises(ValueError, match="max_grad_norm: expected None or a number >= 0"):
        MuScleLoRACallback([{}], max_grad_norm=-1)
    aligner = GradientAligner([torch.nn.Parameter(torch.ones(2))], [{}], lambda m, b: m, max_raw_ratio=0.0)
    with pytest.raises(ValueError, match="with a ready aligner, pass no ref_batches"):
        MuScleLoRACallback([{}], aligner=aligner)
    with pytest.raises(ValueError, match="exactly one of ref_dataset"):
        MuScleLoRATrainer(
            model=tiny_bert(), args=TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to=[])
        )


def test_callback_goes_through_the_one_training_path(tmp_path, monkeypatch):
    """The callback runs AlignClipStep (align, clip; the Trainer steps); a 1-epoch run with warm-up 1 never blends."""
    from muscle_kernels.align import step as step_module

    calls = []
    real = step_module.AlignClipStep.__call__

    def spy(self, model, epoch):
        record = real(self, model, epoch)
        calls.append((self.aligner.gate_config.max_raw_ratio, self.max_grad_norm, self.optimizer, record.align.branch))
        return record

    monkeypatch.setattr(step_module.AlignClipStep, "__call__", spy)
    ga = MuScleLoRACallback([collate(samples(4, 9))], min_ref_loss=1e9, backend="foreach")  # the gate always fails
    trainer = Trainer(
        model=tiny_bert(),
        args=args(tmp_path, num_train_epochs=1, max_grad_norm=0.5),
        train_dataset=samples(8, 1),
        data_collator=collate,
        callbacks=[ga],
    )
    trainer.train()
    assert calls == [(0.0, 0.5, None, "raw")] * 2
