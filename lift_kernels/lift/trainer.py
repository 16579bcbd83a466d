"""The LIFT training loop: phases of epochs over samples, one AdamW, gradient accumulation
up to a whole epoch per step, data parallel over ranks.

A plain torch loop rather than transformers.Trainer, on purpose: the schedule is a handful of
optimiser steps over a few dozen samples of one document, trained while a user waits, and its
two defining choices -- a whole epoch gathered into one step and an exact, seed-driven split
of every step's samples over ranks, so that K processes reproduce one process -- are a few
lines here but would fight Trainer's sampler, gradient-accumulation and DDP wrapping.  The
loop is generic over the parameter list, so any adapter trains through it; python/ shows
Trainer driving the same adapter for users who want its ecosystem instead."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import torch

from .config import LiftConfig
from .data import Sample
from .distributed import DistContext, all_reduce_grads, all_reduce_sum, shard_step


@dataclass
class Phase:
    """`epochs` passes over `samples` (a phase's samples are shuffled every epoch)."""

    name: str
    samples: list[Sample]
    epochs: int


@dataclass
class TrainStats:
    """step_losses: each optimiser step's loss (over all ranks): the mean sample loss, plus
    kl_weight times the mean KL on the anchors when there are any;
    tokens: tokens through forward+backward, all ranks; seconds: the loop's wall time."""

    step_losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def step_groups(num_samples: int, epoch_seed: str, steps_per_epoch: int) -> list[list[int]]:
    """One epoch's shuffled sample indices cut into steps_per_epoch near-equal groups (fewer
    when there are fewer samples).  The same on every rank: it depends on the seed only."""
    order = list(range(num_samples))
    random.Random(epoch_seed).shuffle(order)
    steps = min(steps_per_epoch, num_samples)
    bounds = [round(i * num_samples / steps) for i in range(steps + 1)] if steps else [0]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def sample_loss(model, sample: Sample, device) -> torch.Tensor:
    """Mean next-token cross-entropy over the sample's labelled tokens; for an anchor sample,
    the mean over its positions of KL(base || model) of the next-token distributions."""
    ids = sample.input_ids.to(device)[None]
    if sample.teacher is not None:
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        teacher = sample.teacher.to(device)
        return torch.nn.functional.kl_div(logits.log_softmax(-1), teacher, log_target=True,
                                          reduction="batchmean")
    labels = sample.labels.to(device)[None]
    return model(input_ids=ids, labels=labels, use_cache=False).loss


def sample_weights(samples: list[Sample], group: list[int], kl_weight: float) -> list[float]:
    """Each sample's weight in one optimiser step's loss: the mean over the step's document
    samples plus kl_weight times the mean over its anchor samples."""
    anchors = sum(samples[i].teacher is not None for i in group)
    others = len(group) - anchors
    return [kl_weight / anchors if samples[i].teacher is not None else 1.0 / others
            for i in group]


def train(model, params: list[torch.Tensor], phases: list[Phase], config: LiftConfig,
          ctx: DistContext | None = None, progress: bool = True) -> TrainStats:
    """Train `params` (already the only tensors with requires_grad) over the phases.

    Each optimiser step's gradient is that of sample_weights' weighted sum of its samples'
    losses (the mean token loss; KL for anchors); a rank computes its round-robin share, the
    shares are summed over ranks, then clipped to config.max_grad_norm and applied by one AdamW for all phases."""
    from tqdm.auto import tqdm

    ctx = ctx or DistContext()
    params = list(params)
    if not params:
        raise ValueError("train() got no parameters to train")
    device = ctx.device
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    # Every optimiser step: (phase, its shuffled sample indices, this rank's share).
    equal_counts = config.fsdp and ctx.distributed
    plan = [(phase, group, shard_step(len(group), ctx, equal_counts))
            for i, phase in enumerate(phases) for epoch in range(phase.epochs)
            for group in step_groups(len(phase.samples), f"{config.seed}:{i}:{epoch}",
                                     config.steps_per_epoch)]
    passes = sum(len(shard.indices) + shard.padding for *_, shard in plan)
    # Redrawn often on a terminal, rarely in a log file (CI, redirected output).
    bar = tqdm(total=passes, desc="absorb", unit="sample", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10.0,
               disable=not (progress and ctx.is_main))
    rate_label = "tok/s/rank" if ctx.distributed else "tok/s"
    stats = TrainStats()
    model.train()
    start = time.perf_counter()
    local_tokens = 0
    for phase, group, shard in plan:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        weights = sample_weights(phase.samples, group, config.kl_weight)
        # FSDP pads with passes of weight 0 so that every rank joins every all-gather.
        work = [(group[j], weights[j]) for j in shard.indices] + [(group[0], 0.0)] * shard.padding
        for index, weight in work:
            sample = phase.samples[index]
            loss = sample_loss(model, sample, device)
            (loss * weight).backward()
            value = loss.item()
            loss_sum += value * weight
            local_tokens += sample.num_tokens if weight else 0
            elapsed = time.perf_counter() - start
            # Set without a redraw: update() redraws at most every mininterval seconds.
            bar.set_postfix({"phase": phase.name, "loss": f"{value:.3f}",
                             rate_label: f"{local_tokens / max(elapsed, 1e-9):.0f}"},
                            refresh=False)
            bar.update(1)
        all_reduce_grads(params, ctx)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        stats.step_losses.append(all_reduce_sum(loss_sum, ctx))
        stats.steps += 1
    bar.close()
    model.eval()
    stats.seconds = time.perf_counter() - start
    stats.tokens = int(all_reduce_sum(local_tokens, ctx))
    return stats

