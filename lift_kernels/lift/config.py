"""The LIFT recipe as one dataclass.  Every default is the authors' setting (LIFT.md) unless
its comment says otherwise; change any field to change the recipe."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from ..memory import GatedMemoryConfig

ADAPTERS = ("gated-memory", "lora")
SAMPLE_UNITS = ("segment", "line")
RECITE_PROMPT = "Given above context, please recite following segment of the context:"


@dataclass
class LiftConfig:
    """How a document becomes training samples, how they are trained, how questions are asked.

    Samples:
        segment_length, segment_stride: overlapping token segments of the document (title
            first); the last, possibly shorter, segment reaches the document's end.
        title: prepended to the document (followed by a blank line) before tokenising.
        contextualized: prefix each segment with a short context (a random head piece of the
            document, "...", a tail piece; `context_tokens` in all) and `recite_prompt`; the
            loss stays on the segment.  QA samples then carry the same kind of context.
        num_generated_qa, qa_window_tokens: self-generated QA (``qa="generate"``): this many
            random windows of this many tokens, one candidate pair each, kept only when the
            answer appears verbatim in its window.
    Schedule:
        segment_epochs on segments, then qa_epochs on segments + QA pairs (segments only when
        there are no pairs), one AdamW for both phases.  steps_per_epoch optimiser steps per
        epoch: 1 accumulates the whole epoch into one step, as the authors did.
        dtype: "auto" = bfloat16 on GPU, float32 on CPU (the base model's compute dtype; the
            trained parameters stay float32).
    Token selection (Rho-1's selective language modelling; the frozen base's own next-token
    loss, computed once before training, decides which tokens carry the loss):
        sample_unit: "segment" (the overlapping segments above) or "line" (every non-blank
            line of the document on its own, after the tokenizer's BOS: a fact trained
            without the text around it is recalled from the fact's own words).
        select_line_nats: with lines, keep a line only when the base's loss on one of its
            tokens reaches this many nats (None: every line).
        select_token_nats: the loss only on tokens the base finds at least this surprising
            (None: every token); a sample left with no such token is dropped.
        plain_lines, plain_passages, passage_tokens: beside the selected samples, this many
            evenly spaced lines and passages of passage_tokens (the first at the document's
            head, the last at its tail) with the loss on every token.
    Keeping the base intact (a distillation term on text that is not the document):
        kl_weight: weight of KL(base || patched) per token, averaged over the anchor texts,
            added to every optimiser step's loss (0: off).  The base's distribution is
            computed once, with the adapter not yet attached.
        kl_source: "generated" (kl_texts texts of kl_tokens tokens that the base samples
            from its BOS before absorbing, seeded) or a UTF-8 text file of ordinary text
            (cut into kl_texts pieces of kl_tokens tokens).
    Adapter:
        adapter: "gated-memory" (this package's kernels) or "lora" (PEFT).
        backend: the gated-memory attention backend ("auto", "torch", "triton", ...).
        memory: sizes and gate constants of Gated Memory.
        lora_rank, lora_alpha, lora_targets: the LoRA adapter ("all-linear" = PEFT's choice of
            every linear layer except the output head).
    Inference:
        answer_context_tokens: document tokens placed before a question (half from the head,
            half from the tail, joined by "..."); None = the model's window (at most 8192)
            minus max_new_tokens and 256 tokens of room for the question.
        max_new_tokens: greedy decoding length.
    Distributed (under torchrun):
        fsdp: shard the frozen base with torch.distributed.fsdp.fully_shard.
        dist_timeout_s: how long a collective waits for a silent rank before the job fails.
    """

    segment_length: int = 2048
    segment_stride: int = 768
    title: str | None = None
    contextualized: bool = False
    context_tokens: int = 1024
    recite_prompt: str = RECITE_PROMPT
    num_generated_qa: int = 10
    qa_window_tokens: int = 512

    segment_epochs: int = 3
    qa_epochs: int = 5
    steps_per_epoch: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    dtype: str = "auto"
    # Off by default: it trades a second forward for activation memory, which only a
    # large base at long segments needs (the authors' 8B runs used it).
    gradient_checkpointing: bool = False
    seed: int = 0

    sample_unit: str = "segment"
    select_line_nats: float | None = None
    select_token_nats: float | None = None
    plain_lines: int = 0
    plain_passages: int = 0
    passage_tokens: int = 128

    kl_weight: float = 0.0
    kl_source: str = "generated"
    kl_texts: int = 16
    kl_tokens: int = 64

    adapter: str = "gated-memory"
    backend: str = "auto"
    memory: GatedMemoryConfig = field(default_factory=GatedMemoryConfig)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: str | list[str] = "all-linear"

    answer_context_tokens: int | None = None
    max_new_tokens: int = 64

    fsdp: bool = False
    dist_timeout_s: float = 600.0

    def __post_init__(self):
        positive = ("segment_length", "segment_stride", "context_tokens", "qa_window_tokens",
                    "steps_per_epoch", "lora_rank", "lora_alpha", "max_new_tokens",
                    "passage_tokens", "kl_texts", "kl_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LiftConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_generated_qa", "segment_epochs", "qa_epochs", "seed", "plain_lines",
                     "plain_passages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LiftConfig.{name} must be an int >= 0, got {value!r}")
        if self.segment_epochs + self.qa_epochs == 0:
            raise ValueError("LiftConfig.segment_epochs + qa_epochs must be at least 1 "
                             "(nothing would be trained)")
        if self.segment_stride > self.segment_length:
            raise ValueError(
                f"LiftConfig.segment_stride ({self.segment_stride}) must not exceed "
                f"segment_length ({self.segment_length}): tokens between segments would be "
                "skipped")
        if self.answer_context_tokens is not None and (
                not isinstance(self.answer_context_tokens, int) or self.answer_context_tokens < 0):
            raise ValueError("LiftConfig.answer_context_tokens must be None or an int >= 0, "
                             f"got {self.answer_context_tokens!r}")
        for name in ("lr", "max_grad_norm", "eps", "dist_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LiftConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"LiftConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"LiftConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.sample_unit not in SAMPLE_UNITS:
            raise ValueError(f"LiftConfig.sample_unit must be one of {SAMPLE_UNITS}, got "
                             f"{self.sample_unit!r}")
        for name in ("select_line_nats", "select_token_nats"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, float)) or not value >= 0):
                raise ValueError(f"LiftConfig.{name} must be None or a number >= 0, got {value!r}")
        if self.select_line_nats is not None and self.sample_unit != "line":
            raise ValueError("LiftConfig.select_line_nats needs sample_unit='line'")
        if isinstance(self.kl_weight, bool) or not isinstance(self.kl_weight, (int, float)) \
                or not self.kl_weight >= 0:
            raise ValueError(f"LiftConfig.kl_weight must be a number >= 0, got {self.kl_weight!r}")
        if not isinstance(self.kl_source, str) or not self.kl_source:
            raise ValueError("LiftConfig.kl_source must be 'generated' or a text file path, got "
                             f"{self.kl_source!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"LiftConfig.adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("LiftConfig.dtype must be 'auto', 'float32', 'bfloat16' or "
                             f"'float16', got {self.dtype!r}")
        if isinstance(self.memory, dict):
            self.memory = GatedMemoryConfig(**self.memory)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "LiftConfig":
        """Inverse of to_dict; unknown keys are an error (they are typos of real ones)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LiftConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


# Named recipes: LiftConfig fields over the defaults.  A preset is a starting point; any
# field given beside it (a --config file, command-line options, keyword arguments) wins.
RECIPES = {
    # The authors' recipe (LIFT.md): overlapping segments, 3 + 5 epochs, lr 1e-3.
    "authors": {},
    # Token-selective line training held to the base by a KL anchor, chosen by measurement
    # on the embedded demo (bench/RESULTS.md, "LIFT recipes"): the lines the base finds
    # surprising (a token >= 8 nats), the loss on their surprising tokens (>= 4 nats), and
    # KL(base || patched) on 8 texts of 48 tokens the base sampled before absorbing, which
    # replaced the demo's earlier plain-LM lines (unrelated-text loss +0.89 -> +0.05
    # nats/token); 400 full-batch AdamW steps at lr 3e-2 (at 6e-2 recall fell to 0.08),
    # memory hidden 64, the gate starting half open (from the authors' 0.047 start recall
    # was 0.08 after 200 steps).
    "demo": {
        "sample_unit": "line", "select_line_nats": 8.0, "select_token_nats": 4.0,
        "kl_weight": 1.0, "kl_texts": 8, "kl_tokens": 48,
        "segment_epochs": 400, "qa_epochs": 0, "steps_per_epoch": 1, "lr": 3e-2,
        "weight_decay": 0.0, "memory": {"mem_hidden": 64, "gate_shift": 0.0},
    },
}


def recipe(name: str, **overrides) -> LiftConfig:
    """The named preset (RECIPES) with `overrides` (LiftConfig fields; a "memory" dict
    updates the preset's memory fields) applied over it."""
    if name not in RECIPES:
        raise ValueError(f"unknown LIFT recipe {name!r}; known: {sorted(RECIPES)}")
    fields_ = dict(RECIPES[name])
    memory = overrides.pop("memory", None)
    if isinstance(memory, GatedMemoryConfig):
        memory = memory.to_dict()
    if memory is not None:
        fields_["memory"] = {**fields_.get("memory", {}), **memory}
    fields_.update(overrides)
    return LiftConfig.from_dict(fields_)
