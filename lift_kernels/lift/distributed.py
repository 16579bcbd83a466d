"""Data parallelism for absorb under torchrun, or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT the same way: `accelerate launch --multi_gpu
--num_processes K` does (it also works without GPUs: the ranks then use gloo), while
`accelerate launch --cpu` with K > 1 goes through MPI and is not supported.

Why an explicit all-reduce and not DistributedDataParallel: an optimiser step of LIFT
accumulates a whole epoch (by default), so there is exactly one gradient exchange per step,
of the memory parameters only (a few MB); DDP's bucketing and overlap have nothing to hide,
while its rule that every rank runs the same number of backward passes with the last one
synchronised would force padding whenever the samples do not split evenly.  One flat
all-reduce of the summed gradients per step gives K processes the same gradient as one
process, for any split.  FSDP2 (fully_shard) can shard the frozen base for a model that does
not fit one device; the trained parameters stay replicated (`ignored_params`) and go through
the same all-reduce.  FSDP's all-gathers are collectives, so then every rank runs the same
number of forward passes (see Shard.padding)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A collective failed: another rank crashed, hung past the timeout, or disagreed."""


@dataclass
class DistContext:
    """This process's place in the job; world_size 1 when not launched distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_distributed() -> bool:
    """True when a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def init_distributed(timeout_s: float = 600.0, device: str | torch.device | None = None) -> DistContext:
    """Join (or reuse) the process group: NCCL when CUDA is available, gloo otherwise; each
    rank on cuda:LOCAL_RANK or the CPU.  Without a launcher: a single-process context."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if not launched_distributed():
        return DistContext(device=device, timeout_s=timeout_s)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, timeout_s,
                       owns)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _collective(ctx: DistContext, what: str, fn):
    try:
        return fn()
    except Exception as e:  # gloo/NCCL raise several types; all mean the same to the user
        raise DistributedError(
            f"rank {ctx.rank} of {ctx.world_size}: {what} failed (waited up to "
            f"{ctx.timeout_s:g} s for the other ranks; one of them probably crashed or hangs, "
            f"see its log): {type(e).__name__}: {e}") from e


@dataclass
class Shard:
    """This rank's part of one optimiser step's samples: indices into the step's sample
    list; `padding` extra forward passes (weight 0) keep FSDP's collectives in step."""

    indices: list[int]
    padding: int = 0


def shard_step(num_samples: int, ctx: DistContext, equal_counts: bool) -> Shard:
    """Round-robin split of a step's (already shuffled) samples over the ranks: rank r takes
    samples r, r+K, r+2K, ...  With equal_counts each rank pads to ceil(n / K) passes."""
    indices = list(range(ctx.rank, num_samples, ctx.world_size))
    padding = 0
    if equal_counts and num_samples:
        padding = -(-num_samples // ctx.world_size) - len(indices)
    return Shard(indices, padding)


def all_reduce_grads(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Sum every parameter's .grad over the ranks, in place, with one flat all-reduce (a
    missing grad counts as zeros)."""
    if not ctx.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    _collective(ctx, "the gradient all-reduce", lambda: dist.all_reduce(flat))
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def all_reduce_sum(value: float, ctx: DistContext) -> float:
    """A Python number summed over the ranks (for logging totals)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(ctx))
    _collective(ctx, "a statistics all-reduce", lambda: dist.all_reduce(t))
    return float(t.item())


def broadcast_params(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Make every rank start from rank 0's values of the trained parameters."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for p in params:
            _collective(ctx, "the parameter broadcast", lambda: dist.broadcast(p.data, src=0))


def check_same(value: str, what: str, ctx: DistContext) -> None:
    """Fail on every rank if ranks disagree on `value` (e.g. a hash of the samples)."""
    if not ctx.distributed:
        return
    gathered = [None] * ctx.world_size
    _collective(ctx, f"the {what} check",
                lambda: dist.all_gather_object(gathered, value))
    if len(set(gathered)) != 1:
        raise DistributedError(f"ranks disagree on the {what}: {gathered}; every rank must be "
                               "given the same model, document, QA and options")


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        _collective(ctx, "a barrier", dist.barrier)


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


def shard_base_model(model: torch.nn.Module, trained: list[torch.Tensor], ctx: DistContext) -> None:
    """FSDP2: shard the frozen base over the ranks, one unit per decoder layer (the classes
    the model lists in _no_split_modules) plus the root; the trained parameters are left out
    (replicated and reduced by all_reduce_grads).  fully_shard moves each rank's shards to
    ctx.device; the trained parameters and any buffer left behind follow here, so a model
    loaded on the CPU never exists whole on one accelerator."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    if not layer_classes:
        raise ValueError(f"{type(model).__name__} does not list its decoder layer classes "
                         "(_no_split_modules); FSDP needs them to shard layer by layer")
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    ignored = set(trained)
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    with torch.no_grad():
        for p in trained:
            p.data = p.data.to(ctx.device)  # in place: the Parameter objects stay the same
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device != ctx.device:
                    setattr(module, name, buffer.to(ctx.device))
