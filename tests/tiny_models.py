"""Tiny BERT classifiers built from a config, with a word-level tokenizer over the test's texts: no downloads,
seconds to train. Shared by the pipeline, CLI and recorder tests; and a tiny BERT with its saved adapter for the
adapter-file and CLI tests."""

import torch
import transformers


def tiny_tokenizer(tmp_path, texts):
    """(tokenizer, vocabulary size) over the words of `texts`."""
    words = sorted({w for t in texts for w in t.lower().replace(",", " ,").split()})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."] + words) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab)), len(words) + 7


def tiny_factory(vocab_size, *, layers=2, intermediate=64):
    """A function returning a fresh 2-label BERT classifier (hidden size 32)."""
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        num_labels=2,
    )

    def factory():
        return transformers.BertForSequenceClassification(config)

    return factory


def save_tiny_bert(folder, words):
    """A word-level tokenizer over `words` (in that order, after the special tokens) and a random 1-layer 2-label BERT
    (hidden size 32) saved to `folder`, as `muscle-lora defend --model` takes it; returns the folder as a str."""
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."] + list(words)))
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    tiny_factory(len(words) + 7, layers=1)().save_pretrained(folder)
    return str(folder)


def tiny_bert(hidden=32):
    """A random 1-layer 2-label BERT over 30 token ids (hidden size `hidden`)."""
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertForSequenceClassification(config)


def saved_adapter(tmp_path, hidden=32):
    """The folder save_adapter writes for tiny_bert(hidden) with the default recipe (seed 0)."""
    from muscle_kernels import apply_muscle_lora, save_adapter

    torch.manual_seed(0)
    path = tmp_path / f"adapter{hidden}"
    save_adapter(apply_muscle_lora(tiny_bert(hidden)), path)
    return path
