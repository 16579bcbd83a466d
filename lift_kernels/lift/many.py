"""absorb_many: one memory per document, all trained in the same run.

The model gets one Gated Memory slot per document (replace_attention(num_memories=K)).
Every optimiser step packs the step's samples of all documents into shared forward and
backward calls, each batch row reading and training its own document's slot
(lift_kernels.memory_slots; padded rows run the op on packed sequences).  What stays per
document is everything that makes absorbing a document alone what it is: its samples and
their selection, its schedule (the same shuffled step groups, from its own seed), its loss
weights, its gradient clipping and its AdamW state.

Why one shared backward gives each document its own gradient: a row's output depends on
its own slot only, and the loss is a sum of per-document losses, each normalised as the
single-document trainer normalises it (sample_weights).  So the gradient of slot d is
exactly document d's gradient, and its norm (for clipping) is read off slot d alone.  Each
memory therefore equals what `absorb` gives for that document alone, up to float rounding
(tested: tests/test_many.py)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from . import adapters
from .config import LiftConfig
from .data import IGNORE, Sample
from .inference import model_device
from .pipeline import AbsorbResult, _enable_checkpointing, prepare_samples
from .selective import anchor_samples
from .trainer import TrainStats, sample_weights, step_groups

# Rows x longest row per packed forward: the logits of one call are batch_tokens x vocabulary
# floats, so a large-vocabulary model wants fewer (at 128k words, 16k tokens = 8 GiB).
DEFAULT_BATCH_TOKENS = 16384

# LiftConfig fields every document must share: one memory layout and one model set-up.
SHARED_FIELDS = ("adapter", "memory", "backend", "dtype", "gradient_checkpointing", "fsdp")


@dataclasses.dataclass
class ManyResult:
    """documents: one AbsorbResult per document, in order (its `slot` in `model`, its own
    stats: step losses and tokens; seconds is the shared run's wall time); stats: the whole
    run (tokens of all documents, wall seconds, optimiser steps of the longest schedule)."""

    model: torch.nn.Module
    documents: list[AbsorbResult]
    stats: TrainStats

    @property
    def tokens_per_second(self) -> float:
        return self.stats.tokens_per_second

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self):
        return iter(self.documents)

    def __getitem__(self, index) -> AbsorbResult:
        return self.documents[index]

    def save(self, out_dir, names=None) -> list[str]:
        """Write one single-memory file per document, `out_dir`/<name>.safetensors (names:
        one per document, default document0, document1, ...); returns the paths."""
        names = [f"document{i}" for i in range(len(self))] if names is None else list(names)
        if len(names) != len(self) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(self)} distinct names, got {names!r}")
        if not os.path.isdir(out_dir):
            raise ValueError(f"out_dir {str(out_dir)!r} is not a directory")
        paths = []
        for name, result in zip(names, self.documents):
            path = os.path.join(out_dir, f"{name}.safetensors")
            result.save(path + ".tmp")
            os.replace(path + ".tmp", path)
            paths.append(path)
        return paths


def absorb_many(model, tokenizer, documents, *, qa=None, config=None, progress: bool = True,
                batch_tokens: int = DEFAULT_BATCH_TOKENS, generate=None) -> ManyResult:
    """Train each of `documents` into its own Gated Memory slot of `model`, in one run.

    model: a base Hugging Face causal LM without gated memory (on the device and in the dtype
        to train in); it is patched in place with num_memories=len(documents).
    documents: a list of str.
    qa: None, "none" or "generate" for every document, or a list with one entry per
        document (None, "generate", a JSON path, or a list of pairs), as absorb's `qa`.
    config: one LiftConfig for all, or a list with one per document (they may differ in
        anything but SHARED_FIELDS: seeds, schedules, learning rates, selection, ...).
    batch_tokens: rows x longest row per packed forward (steps larger than this run in
        several forward/backward calls, accumulated).
    Returns a ManyResult: per document the memory `absorb(model, tokenizer, document, ...)`
    would train alone (slot d of the returned model), and the run's stats."""
    documents, configs, qas = _check_inputs(documents, qa, config, batch_tokens)
    device = model_device(model)
    # The KL anchors depend on the base and the recipe's seed and kl_* fields only: made
    # once per distinct recipe, not once per document.
    anchors = {}
    prepared = []
    for doc, q, c in zip(documents, qas, configs):
        key = (c.seed, c.kl_weight, c.kl_source, c.kl_texts, c.kl_tokens)
        if key not in anchors:
            anchors[key] = anchor_samples(model, tokenizer, c, device)
        prepared.append(prepare_samples(model, tokenizer, doc, q, c, device, generate,
                                        anchors[key]))
    fingerprint = adapters.model_fingerprint(model)
    model, params = adapters.attach_slots(model, configs)
    if configs[0].gradient_checkpointing:
        _enable_checkpointing(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_document, stats = train_slots(model, params, [p.phases(c) for p, c in
                                                      zip(prepared, configs)],
                                      configs, pad, batch_tokens, progress)
    results = [AbsorbResult(model, [adapters.slot_view(p, slot, len(configs)) for p in params],
                            doc_stats, c, fingerprint, len(p.ids), len(p.segments), p.pairs,
                            sum(int((s.labels != IGNORE).sum()) for s in p.segments),
                            len(p.anchors), slot=slot)
               for slot, (p, c, doc_stats) in enumerate(zip(prepared, configs, per_document))]
    return ManyResult(model, results, stats)


def _check_inputs(documents, qa, config, batch_tokens):
    if not isinstance(documents, (list, tuple)) or not documents:
        raise TypeError(f"documents must be a non-empty list of str, got {documents!r:.80}")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise TypeError(f"documents[{i}] must be a str, got {type(doc).__name__}")
    n = len(documents)
    configs = [config or LiftConfig()] * n if not isinstance(config, (list, tuple)) \
        else list(config)
    if len(configs) != n or not all(isinstance(c, LiftConfig) for c in configs):
        raise ValueError(f"config must be a LiftConfig or a list of {n} LiftConfig (one per "
                         f"document), got {config!r:.80}")
    for field in SHARED_FIELDS:
        values = [getattr(c, field) for c in configs]
        if any(v != values[0] for v in values):
            raise ValueError(f"config: every document must share LiftConfig.{field} (one "
                             f"memory layout and model set-up), got {values}")
    if configs[0].adapter != "gated-memory":
        raise ValueError("absorb_many trains Gated Memory slots (adapter='gated-memory'); "
                         "absorb LoRA adapters one document at a time")
    if configs[0].fsdp:
        raise ValueError("absorb_many runs in one process; fsdp is not supported")
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("absorb_many runs in one process, not under torchrun")
    if qa is None or isinstance(qa, str):
        if isinstance(qa, str) and qa not in ("none", "generate"):
            raise ValueError(f"qa must be None, 'none', 'generate' or a list with one entry "
                             f"per document, got {qa!r}")
        qas = [qa] * n
    elif isinstance(qa, (list, tuple)) and len(qa) == n:
        for i, q in enumerate(qa):
            if not (q is None or isinstance(q, (str, os.PathLike, list))):
                raise ValueError(f"qa[{i}] must be None, 'generate', a JSON path or a list of "
                                 f"pairs for document {i}, got {type(q).__name__}")
        qas = list(qa)
    else:
        raise ValueError(f"qa must be None, 'none', 'generate' or a list of {n} entries (one "
                         f"per document), got {qa!r:.80}")
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    return list(documents), configs, qas


def train_slots(model, params, phases, configs: list[LiftConfig], pad_id: int,
                batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True):
    """Train memory slot d of `params` on `phases[d]` with `configs[d]`, all slots in shared
    calls.  Slot d's optimiser steps are those trainer.train would take for phases[d] and
    configs[d] alone (same step groups, sample weights, clipping and AdamW); the run lasts
    as long as the longest schedule, and a slot whose schedule has ended takes no step.
    Returns (per-slot TrainStats, the run's TrainStats)."""
    import lift_kernels
    from tqdm.auto import tqdm

    num_slots = len(configs)
    device = model_device(model)
    views = [[adapters.slot_view(p, d, num_slots) for p in params] for d in range(num_slots)]
    # foreach: one call per update over a slot's tensors (the same arithmetic as the
    # per-tensor loop absorb's AdamW runs on a CPU, without its per-tensor dispatches).
    optimizers = [torch.optim.AdamW(views[d], lr=c.lr, betas=c.betas, eps=c.eps,
                                    weight_decay=c.weight_decay, foreach=True)
                  for d, c in enumerate(configs)]
    # Each slot's optimiser steps, as trainer.train plans them: (phase, sample indices).
    plans = [[(phase, group) for i, phase in enumerate(slot_phases)
              for epoch in range(phase.epochs)
              for group in step_groups(len(phase.samples), f"{c.seed}:{i}:{epoch}",
                                       c.steps_per_epoch)]
             for slot_phases, c in zip(phases, configs)]
    num_steps = max(len(plan) for plan in plans)
    bar = tqdm(total=num_steps, desc=f"absorb {num_slots} documents", unit="step",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0,
               disable=not progress)
    per_slot = [TrainStats() for _ in configs]
    stats = TrainStats()
    model.train()
    start = time.perf_counter()
    for step in range(num_steps):
        rows = []  # (slot, sample, weight in its slot's loss)
        active = [d for d in range(num_slots) if step < len(plans[d])]
        for d in active:
            phase, group = plans[d][step]
            weights = sample_weights(phase.samples, group, configs[d].kl_weight)
            rows += [(d, phase.samples[i], w) for i, w in zip(group, weights)]
        for p in params:
            p.grad = None
        losses = [0.0] * num_slots
        for chunk in _chunks(rows, batch_tokens):
            slots = torch.tensor([d for d, _, _ in chunk], dtype=torch.int64)
            weights = torch.tensor([w for _, _, w in chunk], dtype=torch.float32,
                                   device=device)
            with lift_kernels.memory_slots(model, slots):
                values = row_losses(model, [s for _, s, _ in chunk], pad_id, device)
            (values * weights).sum().backward()
            for (d, sample, w), value in zip(chunk, values.tolist()):
                losses[d] += value * w
                per_slot[d].tokens += sample.num_tokens
        for d in active:
            for view, p in zip(views[d], params):
                view.grad = (adapters.slot_view(p.grad, d, num_slots) if p.grad is not None
                             else torch.zeros_like(view))
            torch.nn.utils.clip_grad_norm_(views[d], configs[d].max_grad_norm)
            optimizers[d].step()
            per_slot[d].step_losses.append(losses[d])
            per_slot[d].steps += 1
        stats.steps += 1
        stats.step_losses.append(sum(losses[d] for d in active))
        tokens = sum(s.tokens for s in per_slot)
        bar.set_postfix({"documents": len(active),
                         "tok/s": f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}"},
                        refresh=False)
        bar.update(1)
    bar.close()
    model.eval()
    for view_list in views:
        for view in view_list:
            view.grad = None
    stats.seconds = time.perf_counter() - start
    stats.tokens = sum(s.tokens for s in per_slot)
    for s in per_slot:
        s.seconds = stats.seconds
    return per_slot, stats


def _chunks(rows, batch_tokens: int):
    """The step's rows, longest first, cut into packed calls of at most batch_tokens = rows x
    longest row (a longer row runs alone), and cut where a row is at most half the call's
    longest, so that padding never takes more than half of a call (short lines do not pad
    up to long anchor texts)."""
    rows = sorted(rows, key=lambda row: -row[1].num_tokens)
    chunk = []
    for row in rows:
        longest = chunk[0][1].num_tokens if chunk else 0
        if chunk and ((len(chunk) + 1) * longest > batch_tokens
                      or 2 * row[1].num_tokens <= longest):
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


def row_losses(model, samples: list[Sample], pad_id: int, device) -> torch.Tensor:
    """[R] float32: each sample's loss as trainer.sample_loss computes it alone (the mean
    next-token cross-entropy over its labelled tokens; for an anchor, the mean over its
    positions of KL(base || model)), from one right-padded forward of all of them."""
    width = max(s.num_tokens for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    targets = torch.full((len(samples), width - 1), IGNORE, dtype=torch.long)
    for r, s in enumerate(samples):
        n = s.num_tokens
        ids[r, :n], mask[r, :n] = s.input_ids, 1
        if s.teacher is None:
            targets[r, :n - 1] = s.labels[1:]
    ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    # The vocabulary-wide softmax only where a loss reads it: the labelled positions, and
    # every position of the anchor rows.
    labelled = targets != IGNORE
    nll = torch.nn.functional.cross_entropy(logits[labelled].float(), targets[labelled],
                                            reduction="none")
    row_of = labelled.nonzero()[:, 0]
    counts = labelled.sum(1)
    losses = torch.zeros(len(samples), device=device).index_add(0, row_of, nll)
    losses = losses / counts.clamp(min=1)
    anchors = [r for r, s in enumerate(samples) if s.teacher is not None]
    if anchors:
        rows = torch.tensor(anchors, device=device)
        teacher = torch.zeros(len(anchors), width - 1, logits.shape[-1], device=device)
        for j, r in enumerate(anchors):
            teacher[j, :samples[r].num_tokens - 1] = samples[r].teacher
        positions = mask[rows, 1:].float()  # the anchor's own positions 0..n-2
        pointwise = torch.nn.functional.kl_div(logits[rows].float().log_softmax(-1), teacher,
                                               log_target=True, reduction="none").sum(-1)
        kl = (pointwise * positions).sum(1) / positions.sum(1)
        losses = losses.index_put((rows,), kl)
    return losses
