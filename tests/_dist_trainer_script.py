"""A 2-process Trainer run with the MuScleLoRA callback, launched by tests/test_distributed_trainer.py through
`accelerate launch` (or torchrun). Writes the callback's history and the logged ga_* entries of every rank to
OUT_DIR/rank{r}.json. Not a test module itself."""

import json
import os
import sys

import torch
import transformers
from transformers import TrainingArguments

from muscle_kernels import apply_muscle_lora
from muscle_kernels.integrations.trainer import MuScleLoRATrainer

VOCAB, LABELS = 60, 3


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


def fsdp2_unsupported():
    """Why this transformers cannot train a model already sharded by FSDP2 (None when it can)."""
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError:
        return f"transformers {transformers.__version__} has no DistributedConfig (FSDP2 models sharded at load time)"
    if not hasattr(transformers.Trainer, "_defer_fsdp_gradient_reduction"):
        return f"transformers {transformers.__version__}'s Trainer does not train pre-sharded FSDP2 models"
    return None


def run(out_dir, mode):
    torch.manual_seed(0)
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
    model = apply_muscle_lora(transformers.BertForSequenceClassification(config))
    if mode == "fsdp2":
        # accelerate (1.15) turns FSDP on only for accelerator devices: on the CPU its state stays MULTI_CPU (DDP)
        # whatever the launcher asks. So the model is sharded here the way accelerate's fsdp2_prepare_model does it
        # (each layer, then the root) and marked as FSDP2-managed, as transformers marks a model it shards at load
        # time (DistributedConfig): the Trainer then leaves placement and gradient reduction to FSDP2.
        from torch.distributed.fsdp import fully_shard
        from transformers.distributed import DistributedConfig

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        model._is_distributed_loading_by_transformers = True
        model.config.distributed_config = DistributedConfig(fsdp_size=torch.distributed.get_world_size())
    kw = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        gradient_accumulation_steps=2,
    )
    trainer = MuScleLoRATrainer(
        model=model,
        args=TrainingArguments(**kw),
        train_dataset=samples(48, 1),
        data_collator=collate,
        ref_dataset=samples(16, 9),
        aligner_kwargs=dict(backend="foreach", min_ref_loss=0.0),
    )
    trainer.train()
    from torch.distributed.tensor import DTensor

    sharded = sorted({isinstance(p, DTensor) for p in trainer.model.parameters() if p.requires_grad})
    logs = [
        {k: v for k, v in e.items() if k.startswith("ga_") or k in ("loss", "step")}
        for e in trainer.state.log_history
        if "loss" in e
    ]
    return dict(
        history=trainer.muscle_callback.history,
        logs=logs,
        sharded=sharded,
        ref_sampler=type(trainer.muscle_callback.ref_batches.sampler).__name__,
        distributed_type=str(trainer.accelerator.distributed_type),
        global_step=trainer.state.global_step,
    )


def main(out_dir):
    transformers.logging.set_verbosity_error()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    out = {"ddp": run(out_dir, "ddp")}
    reason = fsdp2_unsupported()
    out["fsdp2"] = {"unsupported": reason} if reason else run(out_dir, "fsdp2")
    with open(os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    # Tear the group down before exit: a gloo group left to the interpreter's exit can abort a rank
    # ("terminate called without an active exception", exit -6) after the work is done.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
