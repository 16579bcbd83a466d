"""absorb: a document (and optional QA) into a model's adapter; load_model: a base model and
its tokenizer from a path or the embedded demo."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import warnings

import torch

from . import adapters
from .config import LiftConfig
from .data import IGNORE, document_ids, line_samples, plain_samples, qa_samples, segment_samples
from .distributed import (DistContext, broadcast_params, check_same, init_distributed,
                          shard_base_model)
from .errors import ModelLoadError
from .inference import greedy_completion, model_device
from .qa import QAPair, generate_qa, load_qa
from .selective import anchor_samples, select_samples
from .trainer import Phase, TrainStats, train


@dataclasses.dataclass
class AbsorbResult:
    """model: the base with its trained adapter (eval mode); params: the trained tensors;
    fingerprint: the base model's (adapters.model_fingerprint), for saving; num_segments:
    the document samples trained on (segments or lines, after token selection, with the
    plain ones)."""

    model: torch.nn.Module
    params: list[torch.Tensor]
    stats: TrainStats
    config: LiftConfig
    fingerprint: str
    document_tokens: int
    num_segments: int
    qa_pairs: list[QAPair] = dataclasses.field(default_factory=list)
    labelled_tokens: int = 0  # document tokens that carry the loss (after selection)
    num_anchors: int = 0      # KL anchor texts
    slot: int | None = None   # absorb_many: the document's memory slot in `model`

    @property
    def tokens_per_second(self) -> float:
        return self.stats.tokens_per_second

    def save(self, path) -> None:
        """Write the adapter to `path` (safetensors); call on rank 0 only.  A document of
        absorb_many writes its own slot as an ordinary single-memory file."""
        adapters.save(self.model, path, self.config, self.fingerprint, self.slot)


def resolve_dtype(name, device) -> torch.dtype:
    """LiftConfig.dtype: 'auto' = bfloat16 on GPU, float32 on CPU (a torch.dtype passes)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(spec: str, device: str | torch.device = "cpu", dtype="auto"):
    """(model, tokenizer) from a Hugging Face checkpoint directory (or a hub id already in
    the local cache: nothing is downloaded), or the embedded demo model for spec == 'demo';
    on `device`, in `dtype` (a torch.dtype or a LiftConfig.dtype name).  ModelLoadError when
    the path holds no causal language model."""
    device = torch.device(device)
    if spec == "demo":
        try:
            from ..demo_model import load_demo_model
        except ImportError as e:
            raise ModelLoadError("the embedded demo model (lift_kernels.demo_model."
                                 f"load_demo_model) is not available: {e}") from None
        model, tokenizer = load_demo_model()
        return model.to(device, resolve_dtype(dtype, device)), tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(spec) and (os.path.isabs(spec) or spec.startswith(".") or
                                    spec.count("/") != 1):
        raise ModelLoadError(f"model {spec!r} is not a directory (nor a hub id like "
                             "'org/name'); give a checkpoint saved with save_pretrained or 'demo'")
    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {spec!r} has no readable Hugging Face config "
                             f"(config.json): {e}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelLoadError(f"model {spec!r} is a {config.model_type!r} model, not a causal "
                             "language model (AutoModelForCausalLM cannot load it)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=resolve_dtype(dtype, device), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {spec!r} cannot be loaded as a causal language model "
                             f"with its tokenizer: {e}") from None
    return model.to(device), tokenizer


def absorb(model, tokenizer, document: str, *, qa=None, config: LiftConfig | None = None,
           progress: bool = True, ctx: DistContext | None = None, generate=None) -> AbsorbResult:
    """Train `document` into an adapter of `model` with the LIFT recipe in `config`.

    model: a Hugging Face causal LM (on the device and in the dtype to train in; under
        torchrun it is moved to this rank's device).  It is modified in place and returned in
        the result with its adapter.
    qa: None or "none" (no QA), "generate" (the model writes pairs from random windows before
        training; `generate(prompt_ids) -> text` may replace it), a JSON file path, or a list
        of {"question", "answer"} dicts / QAPair.
    ctx: the distributed context; by default joins the torchrun group when launched by one.
        With config.fsdp under torchrun the model may stay on the CPU: each rank moves only
        its shard (and the trained parameters) to its device.  A model sharded that way
        answers only with every rank taking part: ask on a fresh base with the saved file.
    Returns an AbsorbResult (its .save(path) writes the memory file)."""
    config = config or LiftConfig()
    ctx = ctx or init_distributed(config.dist_timeout_s)
    fsdp = config.fsdp and ctx.distributed
    if fsdp and isinstance(qa, str) and qa == "generate":
        raise ValueError("qa='generate' cannot be combined with fsdp (the unsharded model "
                         "would have to generate); generate the pairs first and pass them")
    if fsdp and (config.kl_weight > 0 or config.select_line_nats is not None
                 or config.select_token_nats is not None):
        raise ValueError("kl_weight and token selection cannot be combined with fsdp (the "
                         "unsharded base would have to score the text)")
    if not ctx.distributed:
        ctx = dataclasses.replace(ctx, device=model_device(model))  # train where it is
    elif not fsdp and model_device(model) != ctx.device:
        model.to(ctx.device)
    prepared = prepare_samples(model, tokenizer, document, qa, config, ctx.device, generate)
    ids, pairs, segments = prepared.ids, prepared.pairs, prepared.segments
    anchors, qa_part = prepared.anchors, prepared.qa
    fingerprint = adapters.model_fingerprint(model)
    torch.manual_seed(config.seed)
    model, params = adapters.attach(model, config)
    broadcast_params(params, ctx)
    check_same(_digest(segments + qa_part + anchors, fingerprint, config), "samples and model",
               ctx)
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    if fsdp:
        shard_base_model(model, params, ctx)
    stats = train(model, params, prepared.phases(config), config, ctx, progress)
    return AbsorbResult(model, params, stats, config, fingerprint, len(ids), len(segments),
                        pairs, sum(int((s.labels != IGNORE).sum()) for s in segments),
                        len(anchors))


@dataclasses.dataclass
class DocumentSamples:
    """What absorb trains one document on: its token ids, QA pairs, document samples
    (segments or lines, after token selection, with the plain ones), KL anchor samples and
    QA samples."""

    ids: list[int]
    pairs: list[QAPair]
    segments: list
    anchors: list
    qa: list

    def phases(self, config: LiftConfig) -> list[Phase]:
        """The recipe's schedule over these samples (the trainer's phases)."""
        return [Phase("segments", self.segments + self.anchors, config.segment_epochs),
                Phase("segments+qa", self.segments + self.qa + self.anchors, config.qa_epochs)]


def prepare_samples(model, tokenizer, document: str, qa, config: LiftConfig, device,
                    generate=None, anchors=None) -> DocumentSamples:
    """A document's training samples, from the base `model` before any adapter is attached
    (it scores the document for token selection and samples the KL anchors).  Seeds torch
    and Python's RNG with config.seed, so the same document and recipe give the same
    samples whether it is absorbed alone or among others (absorb_many).  anchors: the KL
    anchor samples when already made for this model and recipe (selective.anchor_samples:
    they do not depend on the document), else made here."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    ids = document_ids(tokenizer, document, config.title)
    pairs = _qa_pairs(qa, model, tokenizer, ids, config, rng, generate)
    if config.sample_unit == "line":
        segments = line_samples(tokenizer, document, config)
    else:
        segments = segment_samples(tokenizer, ids, config, rng)
    # The base's own judgement, before the adapter exists: which tokens carry the loss, and
    # its distribution on text that is not the document.
    segments = select_samples(model, segments, config, device)
    if not segments:
        raise ValueError("token selection left no sample to train on: lower "
                         "LiftConfig.select_line_nats / select_token_nats")
    segments += plain_samples(tokenizer, document, ids, config)
    if anchors is None:
        anchors = anchor_samples(model, tokenizer, config, device)
    qa_part = qa_samples(tokenizer, ids, pairs, config, rng)
    _warn_beyond_window(model, segments + qa_part + anchors)
    return DocumentSamples(ids, pairs, segments, anchors, qa_part)


def _warn_beyond_window(model, samples) -> None:
    """Samples longer than the model's window train positions it never saw in pretraining
    (say, the default 2048-token segments on a 256-position model): warn, naming the fix."""
    window = getattr(model.config, "max_position_embeddings", None)
    longest = max((s.num_tokens for s in samples), default=0)
    if window and longest > window:
        warnings.warn(f"absorb: training samples of up to {longest} tokens exceed the model's "
                      f"window of {window} positions (max_position_embeddings); pass a "
                      f"segment_length (--segment-length) of at most {window}",
                      RuntimeWarning, stacklevel=3)


def _enable_checkpointing(model) -> None:
    # Non-reentrant checkpointing: the frozen base's inputs need no grad for the memory's
    # gradients to flow.  Newer transformers renamed the method.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _qa_pairs(qa, model, tokenizer, ids, config, rng, generate) -> list[QAPair]:
    if qa is None or (isinstance(qa, str) and qa == "none"):
        return []
    if isinstance(qa, str) and qa == "generate":
        if generate is None:
            def generate(prompt):
                return greedy_completion(model, tokenizer, prompt, config.max_new_tokens)
        return generate_qa(tokenizer, ids, config, generate, rng)
    if isinstance(qa, list) and all(isinstance(p, QAPair) for p in qa) and qa:
        return list(qa)
    return load_qa(qa)


def _digest(samples, fingerprint: str, config: LiftConfig) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(config.to_json().encode())
    for s in samples:
        h.update(s.input_ids.numpy().tobytes())
        h.update(s.labels.numpy().tobytes())
    return h.hexdigest()[:16]
