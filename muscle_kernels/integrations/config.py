"""MuScleLoRAConfig: where the adapters go and how big they are, as a JSON-serialisable dataclass.

`MuScleLoRAConfig.for_model(model)` returns the paper's recipe (docs/layer.md) for the model's architecture:

- BERT-style encoders (a `classifier` Linear on top of `pooler.dense`): plain LoRA r=8, alpha=32 on the attention
  `query`/`value`; MSLR (inner rank 1, alpha 6) on `pooler.dense` and `classifier`.
- RoBERTa-style encoders (a `classifier` module with `dense` + `out_proj`): the same LoRA; MSLR on `classifier.dense`.
- Decoder LLMs with a `score` head (Llama, Mistral, Qwen2, GPT-2, ...): plain LoRA r=2, alpha=8 on the attention
  projections PEFT targets by default (`q_proj`/`v_proj`; GPT-2's fused `c_attn`); the `score` head is replaced by the
  paper's two-layer head (hidden -> 16 -> labels, no bias, dropout 0.1) with MSLR (bands 1..4, alpha 4) on its first
  layer.

Frequency band for encoders, by model size: the paper tunes the band per checkpoint -- [1..9] for bert-large and
roberta-large, [1,4,8,...,28] for bert-base, [1,2,4,6,...,16] for roberta-base. A model counts as "large" when it has
at least 24 layers or a hidden size of at least 1024 (bert/roberta-large: 24 x 1024; base: 12 x 768) and gets [1..9];
a base-size model (hidden size 768 up to 1024, e.g. bert-base, roberta-base, DistilRoBERTa) its family's base band;
a smaller model (hidden size under 768, e.g. MiniLM's 384) the narrow band [1, 2, 3, 4]: with the base bands' scales
(up to 28 x alpha 6) a small head's logits grow so fast that the reference loss underflows to 0 within an epoch
and alignment stops (docs/defense.md has the measurements).

What trains: the paper's code freezes everything except the adapter factors, including the rest of the
classification head (RoBERTa's `classifier.out_proj`, the LLM head's `out_proj`, BERT's classifier base weight): the
adapters learn to map into the frozen, randomly initialised head. `trainable` (empty in the recipe) adds module or
parameter patterns that train in full. The head itself is always saved (`modules_to_save`), because a freshly
initialised head is not part of the pretrained checkpoint and the adapter is useless without it.

Patterns follow PEFT's `target_modules`: a list entry matches a module whose full name equals it or ends with
"." + entry; a single string is a regular expression that must match the full name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .._spec import SpecError, integer, probability
from ..nn.spec import AdapterSpec

__all__ = ["MuScleLoRAConfig", "BANDS"]

Patterns = str | list[str]

# The paper's frequency bands per checkpoint family (its plmDefense.py and llm configs).
BANDS = {
    "large": [1, 2, 3, 4, 5, 6, 7, 8, 9],
    "bert-base": [1, 4, 8, 12, 16, 20, 24, 28],
    "roberta-base": [1, 2, 4, 6, 8, 10, 12, 14, 16],
    "llm": [1, 2, 3, 4],
    "small": [1, 2, 3, 4],  # encoders under base size (not the paper's: measured on MiniLM, docs/defense.md)
}

# Attention projections PEFT's LoRA targets by default, for the model types PEFT does not know or when peft is not
# installed (kept small on purpose: anything else is looked up in peft's own table).
_DEFAULT_LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

_DEFAULT = AdapterSpec()  # the defaults the layer and this config share


@dataclass
class MuScleLoRAConfig:
    """Which modules get adapters and with what hyper-parameters (see the module docstring for the recipes).

    lora_targets: modules that get one plain LoRA branch (freq_band=(1,), inner_rank=lora_rank, alpha=lora_alpha;
        scale alpha/r, as PEFT).
    mslr_targets: modules that get the multi-scale branches (freq_band, inner_rank, mslr_alpha).
    dropout: adapter-input dropout of every adapter layer.
    init: initialisation of the MSLR layers: "lora" (R = 0, the output is unchanged at step 0) or "seed" (the paper's
        kaiming-uniform L and R). Plain LoRA branches always use the LoRA init, as PEFT does.
    trainable: other module or parameter patterns that train in full (everything else is frozen).
    modules_to_save: modules saved in full with the adapter (the classification head).
    score_head_hidden: when set, the model's `score` Linear (hidden -> labels) is replaced by the paper's two-layer
        head hidden -> score_head_hidden -> labels (no bias, dropout score_head_dropout in between); its first layer
        `score.dense` can then be an MSLR target.
    backend: forwarded to MuScleLoRALinear ("auto", "torch", "triton", "reference").
    """

    lora_targets: Patterns = field(default_factory=list)
    lora_rank: int = 8
    lora_alpha: float = 32.0
    mslr_targets: Patterns = field(default_factory=list)
    freq_band: list[float] = field(default_factory=lambda: list(_DEFAULT.freq_band))
    inner_rank: int = _DEFAULT.inner_rank
    mslr_alpha: float = 6.0  # the paper's encoder recipe (the layer's own default, 4, is its LLM one)
    dropout: float = _DEFAULT.dropout
    init: str = _DEFAULT.init
    trainable: Patterns = field(default_factory=list)
    modules_to_save: Patterns = field(default_factory=list)
    score_head_hidden: int | None = None
    score_head_dropout: float = 0.1
    backend: str = "auto"

    def __post_init__(self):
        for name in ("lora_targets", "mslr_targets", "trainable", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set, frozenset)):
                value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
                setattr(self, name, value)
            if not isinstance(value, (str, list)) or (
                isinstance(value, list) and not all(isinstance(p, str) and p for p in value)
            ):
                raise TypeError(
                    f"{name}: expected a list of module-name patterns or one regular expression, got {value!r}"
                )
        if not self.lora_targets and not self.mslr_targets:
            raise ValueError(
                "MuScleLoRAConfig: give lora_targets and/or mslr_targets (module-name patterns); "
                "MuScleLoRAConfig.for_model(model) builds the paper's recipe"
            )
        # Every adapter field goes through AdapterSpec's own check, named as this config names it.
        check = AdapterSpec.check
        self.lora_rank = check("inner_rank", self.lora_rank, name="lora_rank")
        self.lora_alpha = check("alpha", self.lora_alpha, name="lora_alpha")
        self.freq_band = list(check("freq_band", self.freq_band))
        self.inner_rank = check("inner_rank", self.inner_rank)
        self.mslr_alpha = check("alpha", self.mslr_alpha, name="mslr_alpha")
        # the fields together: their scales must stay finite (each one alone can be fine)
        AdapterSpec.check_scales(self.freq_band, self.inner_rank, self.mslr_alpha, alpha_name="mslr_alpha")
        AdapterSpec.check_scales((1,), self.lora_rank, self.lora_alpha, alpha_name="lora_alpha")
        self.dropout = check("dropout", self.dropout)
        self.init = check("init", self.init)
        self.score_head_dropout = probability("score_head_dropout", self.score_head_dropout)
        if self.score_head_hidden is not None:
            try:
                self.score_head_hidden = integer(1)("score_head_hidden", self.score_head_hidden)
            except SpecError as e:
                raise SpecError(e.name, f"None or {e.expected}", e.value) from None

    def lora_spec(self) -> AdapterSpec:
        """The spec of the plain LoRA layers (lora_targets)."""
        return AdapterSpec.lora(self.lora_rank, self.lora_alpha, self.dropout)

    def mslr_spec(self) -> AdapterSpec:
        """The spec of the multi-scale layers (mslr_targets)."""
        return AdapterSpec(tuple(self.freq_band), self.inner_rank, self.mslr_alpha, self.dropout, self.init)

    # -- serialisation -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MuScleLoRAConfig:
        if not isinstance(data, dict):
            raise TypeError(f"data: expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"MuScleLoRAConfig: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MuScleLoRAConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MuScleLoRAConfig:
        with open(path) as f:
            return cls.from_json(f.read())

    def diff(self, other: MuScleLoRAConfig) -> dict:
        """{field: (self's value, other's value)} for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    # -- the paper's recipes -----------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, **overrides) -> MuScleLoRAConfig:
        """The paper's recipe for `model` (a transformers model); keyword arguments override single fields."""
        recipe = _recipe(model, has_lora_targets="lora_targets" in overrides)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"for_model: unknown field(s) {unknown}")
        recipe.update(overrides)
        return cls(**recipe)


def _model_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"model: expected a transformers model with a .config, got {type(model).__name__}; "
            "build MuScleLoRAConfig(lora_targets=..., mslr_targets=...) by hand for other modules"
        )
    return config


def _lora_targets_for(model_type: str) -> list[str] | None:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
    except ImportError:  # peft is optional; our small table covers the paper's models
        peft_table = {}
    targets = _DEFAULT_LORA_TARGETS.get(model_type) or peft_table.get(model_type)
    return list(targets) if targets else None


def _size_class(config) -> str:
    """ "large", "base" or "small" (see the module docstring)."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    if layers >= 24 or hidden >= 1024:
        return "large"
    return "base" if hidden >= 768 else "small"


def _recipe(model, has_lora_targets: bool = False) -> dict:
    from torch import nn

    config = _model_config(model)
    if getattr(model, "muscle_lora_config", None) is not None:  # apply.CONFIG_ATTR (apply imports this module)
        raise ValueError(
            f"MuScleLoRAConfig.for_model: this {type(model).__name__} already has MuScleLoRA adapters "
            "(apply_muscle_lora was called on it); its config is model.muscle_lora_config -- call "
            "for_model on the plain model"
        )
    model_type = getattr(config, "model_type", None) or type(model).__name__
    lora_targets = _lora_targets_for(model_type)
    classifier = getattr(model, "classifier", None)
    score = getattr(model, "score", None)
    pooler_dense = getattr(getattr(getattr(model, "base_model", None), "pooler", None), "dense", None)

    if isinstance(classifier, nn.Module) and isinstance(getattr(classifier, "dense", None), nn.Linear):
        family, mslr_targets, head = "roberta", ["classifier.dense"], "classifier"
    elif isinstance(classifier, nn.Linear) and isinstance(pooler_dense, nn.Linear):
        prefix = next(n for n, m in model.named_modules() if m is pooler_dense)
        family, mslr_targets, head = "bert", [prefix, "classifier"], "classifier"
    elif isinstance(score, nn.Linear):
        family, mslr_targets, head = "llm", ["score.dense"], "score"
    else:
        raise ValueError(
            f"MuScleLoRAConfig.for_model: no recipe for {type(model).__name__} (model_type {model_type!r}): the paper's "
            "recipes need a BERT-style head (pooler.dense + classifier), a RoBERTa-style head (classifier.dense + "
            "classifier.out_proj) or an LLM `score` head. Build MuScleLoRAConfig(lora_targets=[...], "
            "mslr_targets=[...], modules_to_save=[...]) with your model's module names instead"
        )
    if lora_targets is None and not has_lora_targets:
        raise ValueError(
            f"MuScleLoRAConfig.for_model: unknown attention module names for model_type {model_type!r}; pass "
            "lora_targets=[...] (e.g. the query and value projections' names), e.g. "
            f"MuScleLoRAConfig.for_model(model, lora_targets=['q_proj', 'v_proj'])"
        )

    if family == "llm":
        return dict(
            lora_targets=lora_targets,
            lora_rank=2,
            lora_alpha=8.0,
            mslr_targets=mslr_targets,
            freq_band=list(BANDS["llm"]),
            inner_rank=1,
            mslr_alpha=4.0,
            modules_to_save=[head],
            score_head_hidden=16,
            score_head_dropout=0.1,
        )
    size = _size_class(config)
    band = BANDS[size] if size != "base" else BANDS[f"{family}-base"]
    return dict(
        lora_targets=lora_targets,
        lora_rank=8,
        lora_alpha=32.0,
        mslr_targets=mslr_targets,
        freq_band=list(band),
        inner_rank=1,
        mslr_alpha=6.0,
        modules_to_save=[head],
    )
