"""Kernel microbenchmarks (SPEC section 6): every backend of gated_memory_attention and the
baselines, side by side in one run, so that speed claims are ratios measured together.

Contenders, per shape:
    reference   the op's eager backend (N x N scores; the authors' algorithm)
    torch       the op's SDPA + separate MLP backend
    sdpa        SDPA attention alone on the same q, k, v: no RoPE, no memory, no gate.
                The lower bound a fused backend is held against (FlashAttention on CUDA
                where PyTorch has it; the row's note says which SDPA kernel ran).
    cudnn       the same SDPA call with cuDNN attention forced (CUDA only; a row saying
                why when cuDNN declines the case)
    flex        FlexAttention (torch.compile'd) + the separate memory/gate MLPs (CUDA only)
    <fused>     every other backend available on the device (triton, cuda, cpu), each run
                through lift_kernels.gated_memory_attention(backend=...)

Per contender and shape: forward, backward and forward+backward time (median of repeats
after a warm-up; CUDA events on GPU, a monotonic clock on CPU; input sets rotated between
repeats so caches do not flatter), the peak memory a pass needs on top of its inputs, and
TFLOP/s in FlashAttention's convention (attention_flops) with the memory MLP's FLOPs
counted separately (memory_flops).

Peak memory, `peak_mem_bytes`: bytes allocated during one pass beyond what was allocated
before it (the inputs), so outputs, saved activations, gradients and workspaces count.
CUDA: torch.cuda.max_memory_allocated.  CPU: each case runs in a forked child process whose
peak RSS (VmHWM, reset through /proc/self/clear_refs) minus its RSS after the inputs were
made is the figure; the first pass is measured before any warm-up, so memory the allocator
kept from earlier passes cannot hide the peak.

The fwd row's peak covers the forward (graph kept for backward); bwd and fwd_bwd rows carry
the peak of forward+backward.  Command line: `python bench/kernels.py --help` (the same as
`lift-kernels bench`).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from . import __version__, available_backends, build_info
from .dispatch import BACKENDS
from .function import gated_memory_attention
from .install import missing_extra
from .ops.reference import apply_rope, gate_mlp, memory_mlp
from .ops.torch_composite import sdpa_attention

PASSES = ("fwd", "bwd", "fwd_bwd")
BASELINES = ("reference", "torch", "sdpa", "cudnn", "flex")
# Backends that exist only to test kernels on the CPU (Triton's interpreter): never timed
# unless asked for by name.
CPU_TEST_ONLY = ("triton",)
CSV_FIELDS = (
    "backend", "pass", "status", "note", "B", "Nq", "Nk", "Hq", "Hkv", "D", "M", "R",
    "dtype", "causal", "device", "device_name", "ms", "ms_min", "ms_max", "repeats",
    "tflops", "attn_flops", "mem_flops", "peak_mem_bytes", "speedup_vs_reference",
    "speedup_vs_torch", "time_over_sdpa", "mem_over_sdpa", "threads", "torch", "triton",
    "lift_kernels", "date",
)


@dataclass(frozen=True)
class Shape:
    """One benchmark problem.  Inputs: q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D]; memory
    M = 2D, gate R = floor(sqrt(D)) (the defaults); no biases (Llama has none); RoPE on q."""

    batch: int
    nq: int
    nk: int
    hq: int
    hkv: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = True

    @property
    def mem_hidden(self) -> int:
        return 2 * self.head_dim

    @property
    def gate_hidden(self) -> int:
        return max(1, math.isqrt(self.head_dim))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def family(self) -> tuple:
        """Everything but the sequence lengths: the shapes of one curve in the plot."""
        return (self.batch, self.hq, self.hkv, self.head_dim, self.dtype, self.causal)

    def label(self) -> str:
        n = f"N={self.nq}" if self.nq == self.nk else f"Nq={self.nq} Nk={self.nk}"
        return (f"B={self.batch} {n} Hq={self.hq} Hkv={self.hkv} D={self.head_dim} "
                f"{self.dtype}{' causal' if self.causal else ''}")


def attention_flops(shape: Shape, pass_name: str) -> int:
    """FlashAttention's count: forward 4*B*Hq*Nq*Nk*D (two matmuls), halved when causal;
    backward 2.5x forward (five matmuls, one of them recomputing the scores)."""
    fwd = 4 * shape.batch * shape.hq * shape.nq * shape.nk * shape.head_dim
    if shape.causal:
        fwd //= 2
    bwd = fwd * 5 // 2
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_name]


def memory_flops(shape: Shape, pass_name: str) -> int:
    """The memory and gate MLPs' matmul FLOPs: per query token and head, D->M->D
    (4*D*M) plus D->R->1 (2*D*R + 2*R); backward twice forward (input and weight grads)."""
    d, m, r = shape.head_dim, shape.mem_hidden, shape.gate_hidden
    fwd = shape.batch * shape.nq * shape.hq * (4 * d * m + 2 * d * r + 2 * r)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[pass_name]


def _family_sweep(ns, **kw):
    return [Shape(kw.get("batch", 1), n, n, kw["hq"], kw["hkv"], kw["head_dim"],
                  kw.get("dtype", "float32"), kw.get("causal", True)) for n in ns]


def _sweeps() -> dict:
    # The C++/CUDA issue's CPU target shape and the Triton issue's GPU target shape.
    cpu = dict(batch=1, hq=8, hkv=2, head_dim=64)
    gpu = dict(batch=4, hq=32, hkv=8, head_dim=128, dtype="bfloat16")
    cpu_quick = _family_sweep((256, 512, 1024, 2048), **cpu)
    return {
        "smoke": _family_sweep((32, 48), batch=1, hq=2, hkv=1, head_dim=16),
        "cpu-quick": cpu_quick,
        "cpu-full": cpu_quick + _family_sweep((4096,), **cpu)
        + _family_sweep((1024, 2048, 4096), **dict(cpu, head_dim=128))
        + _family_sweep((1024, 2048), **dict(cpu, hkv=8))
        + _family_sweep((1024, 2048), **dict(cpu, dtype="bfloat16")),
        "gpu-target": _family_sweep((4096, 8192, 16384), **gpu),
        "gpu": _family_sweep((1024, 2048, 4096, 8192, 16384, 32768), **gpu)
        + _family_sweep((4096, 16384), **dict(gpu, head_dim=64))
        + _family_sweep((4096, 16384), **dict(gpu, hkv=32))
        + _family_sweep((4096, 16384), **dict(gpu, hkv=1))
        + _family_sweep((4096, 16384), **dict(gpu, dtype="float16")),
    }


SWEEPS = _sweeps()


# ----------------------------------------------------------------------------- contenders

def default_backends(device: str) -> list:
    """In run order: SDPA (the lower bound; cuDNN's too on CUDA), every available fused
    backend, then torch, reference and (CUDA) flex, so that a time budget cuts the
    baselines first."""
    fused = [b for b in available_backends(device) if b not in BASELINES
             and not (device == "cpu" and b in CPU_TEST_ONLY)]
    tail = ["torch", "reference"] + (["flex"] if device == "cuda" else [])
    head = ["sdpa", "cudnn"] if device == "cuda" else ["sdpa"]
    return [*head, *fused, *tail]


def _rope_tables(n, d, device):
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def make_inputs(shape: Shape, device: str, seed: int, with_memory: bool = True) -> dict:
    """Random inputs (never zeros: they can run faster than real data).  Differentiable
    leaves q, k, v (and w1, w2, g1, g2 with_memory) plus cos/sin [Nq, D] and an upstream
    gradient dout [B, Nq, Hq, D].  Drawn straight in the target dtype: no temporaries."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = shape.torch_dtype
    d, m, r = shape.head_dim, shape.mem_hidden, shape.gate_hidden

    def rnd(*size, scale=1.0):
        t = torch.randn(*size, generator=gen, dtype=dt, device=device)
        return t.mul_(scale).requires_grad_(True)

    t = {"q": rnd(shape.batch, shape.nq, shape.hq, d),
         "k": rnd(shape.batch, shape.nk, shape.hkv, d),
         "v": rnd(shape.batch, shape.nk, shape.hkv, d)}
    if with_memory:
        t.update(w1=rnd(shape.hq, d, m, scale=d ** -0.5), w2=rnd(shape.hq, m, d, scale=m ** -0.5),
                 g1=rnd(shape.hq, d, r, scale=d ** -0.5), g2=rnd(shape.hq, r, scale=r ** -0.5))
        t["cos"], t["sin"] = _rope_tables(shape.nq, d, device)
    t["dout"] = torch.randn(shape.batch, shape.nq, shape.hq, d, generator=gen, dtype=dt,
                            device=device)
    return t


def _leaves(t: dict) -> list:
    return [x for x in t.values() if isinstance(x, torch.Tensor) and x.requires_grad]


def _op_runner(name, shape):
    def run(t):
        return gated_memory_attention(
            t["q"], t["k"], t["v"], t["w1"], None, t["w2"], None, t["g1"], None, t["g2"],
            cos=t["cos"], sin=t["sin"], causal=shape.causal, backend=name)
    return run


def _sdpa_runner(shape, device, kernel="flash"):
    """SDPA alone with one kernel forced on CUDA ("flash" or "cudnn").  Returns
    (run, note).  Where the kernel declines the case, flash falls back to SDPA's default
    choice (the note says so) and cudnn raises NotImplementedError (its row says why)."""
    scale = shape.head_dim ** -0.5

    def run(t):
        return sdpa_attention(t["q"], t["k"], t["v"], shape.causal, scale)

    if device != "cuda":
        if kernel == "cudnn":
            raise NotImplementedError("the cudnn baseline runs on CUDA only")
        return run, "SDPA default kernel choice"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choice = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kernel]

    def forced(t):
        with sdpa_kernel(choice):
            return run(t)
    try:
        probe = make_inputs(Shape(1, 128, 128, shape.hq, shape.hkv, shape.head_dim,
                                  shape.dtype, shape.causal), device, 0, with_memory=False)
        torch.autograd.grad(forced(probe), _leaves(probe), probe["dout"])
        return forced, f"SDPA {kernel} kernel"
    except RuntimeError as err:  # no such kernel for this dtype/head dim/GQA: say so
        why = str(err).splitlines()[0]
        if kernel == "cudnn":
            raise NotImplementedError(f"cuDNN attention declined: {why}") from err
        return run, f"SDPA default kernel choice (flash declined: {why})"


def _flex_runner(shape, device):
    """FlexAttention (compiled) for attention + the reference's memory and gate MLPs,
    blended eagerly: the strongest composite built from PyTorch's own pieces."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    offset = shape.nk - shape.nq
    block_mask = None
    if shape.causal:
        def bottom_right(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset
        block_mask = create_block_mask(bottom_right, None, None, shape.nq, shape.nk,
                                       device=device)

    def run(t):
        q, k, v = t["q"], t["k"], t["v"]
        mem = memory_mlp(q, t["w1"], None, t["w2"], None)
        gate = gate_mlp(q.float(), t["g1"].float(), None, t["g2"].float(), 3.0, 1.0)
        q_rot = apply_rope(q, t["cos"], t["sin"])
        attn = compiled(q_rot.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        block_mask=block_mask, enable_gqa=shape.hq != shape.hkv)
        g = gate.unsqueeze(-1).to(q.dtype)
        return (1 - g) * attn.transpose(1, 2) + g * mem
    return run


def _runner(name, shape, device):
    """(run(inputs) -> out, with_memory, note) for contender `name`."""
    if name in ("sdpa", "cudnn"):
        run, note = _sdpa_runner(shape, device, "flash" if name == "sdpa" else name)
        return run, False, note
    if name == "flex":
        if device != "cuda":
            raise NotImplementedError("the flex baseline runs on CUDA only")
        return _flex_runner(shape, device), True, "flex_attention compiled + eager MLPs"
    return _op_runner(name, shape), True, ""


# ----------------------------------------------------------------------------- measuring

def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """VmHWM := the current RSS (Linux >= 4.0).  Where that is refused, the peak is the
    child's since it was forked, which is still at least its baseline."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class _Clock:
    """Times a region: CUDA events on GPU, perf_counter (after a sync) elsewhere."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def time_ms(self, region, arg):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            region(arg)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        region(arg)
        return (time.perf_counter() - begin) * 1e3


def _peak_memory(run, t, device):
    """(forward peak, forward+backward peak) in bytes beyond what was allocated before."""
    leaves = _leaves(t)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run(t)
        torch.cuda.synchronize()
        fwd = torch.cuda.max_memory_allocated() - base
        grads = torch.autograd.grad(out, leaves, t["dout"])
        torch.cuda.synchronize()
        total = torch.cuda.max_memory_allocated() - base
    else:
        gc.collect()
        base = _rss_kib("VmRSS")
        _reset_peak_rss()
        out = run(t)
        fwd = (_rss_kib("VmHWM") - base) * 1024
        grads = torch.autograd.grad(out, leaves, t["dout"])
        total = (_rss_kib("VmHWM") - base) * 1024
    del out, grads
    return max(fwd, 0), max(total, 0)


def measure(name: str, shape: Shape, device: str, *, warmup: int = 1, max_repeats: int = 20,
            min_repeats: int = 3, target_ms: float = 1000.0, input_sets: int = 2) -> dict:
    """Times one contender on one shape.  Returns {pass: {ms, ms_min, ms_max, repeats,
    peak_mem_bytes}} plus "note".  Raises what the contender raises (NotImplementedError,
    torch.OutOfMemoryError, ...); the caller turns that into a row."""
    run, with_memory, note = _runner(name, shape, device)
    # One pass on a tiny problem first: library code pages, thread pools and handles are
    # loaded before the memory is measured, without leaving large freed blocks behind.
    # Same batch as the shape: Triton specialises a kernel that takes the batch size on a
    # batch of 1, and a second set of compiled autotuning configurations would cost minutes
    # on a GPU.
    tiny = make_inputs(Shape(shape.batch, 16, 16, shape.hq, shape.hkv, shape.head_dim,
                             shape.dtype, shape.causal), device, 0, with_memory)
    torch.autograd.grad(run(tiny), _leaves(tiny), tiny["dout"])
    del tiny
    sets = [make_inputs(shape, device, seed, with_memory) for seed in range(input_sets)]
    peak_fwd, peak_total = _peak_memory(run, sets[0], device)
    clock = _Clock(device)

    def fwd(t):
        return run(t)

    def fwd_bwd(t):
        torch.autograd.grad(run(t), _leaves(t), t["dout"])

    def forward_for_bwd(t):
        return t, run(t)

    def bwd(state):
        t, out = state
        torch.autograd.grad(out, _leaves(t), t["dout"])

    for i in range(warmup):
        fwd_bwd(sets[i % len(sets)])
    # Repeats fill about target_ms per pass, within [min_repeats, max_repeats].
    estimate = clock.time_ms(fwd_bwd, sets[0])
    repeats = int(min(max_repeats, max(min_repeats, target_ms // max(estimate, 1e-3))))
    samples = {p: [] for p in PASSES}
    for i in range(repeats):
        t = sets[i % len(sets)]
        samples["fwd"].append(clock.time_ms(fwd, t))
        samples["bwd"].append(clock.time_ms(bwd, forward_for_bwd(t)))
        samples["fwd_bwd"].append(clock.time_ms(fwd_bwd, t))
    result = {"note": note}
    for p in PASSES:
        result[p] = {"ms": statistics.median(samples[p]), "ms_min": min(samples[p]),
                     "ms_max": max(samples[p]), "repeats": repeats,
                     "peak_mem_bytes": peak_fwd if p == "fwd" else peak_total}
    return result


def _measure_or_status(name, shape, device, opts) -> dict:
    """measure(), with failures turned into a status: 'oom', 'unsupported' or 'error'."""
    try:
        return {"status": "ok", **measure(name, shape, device, **opts)}
    except torch.OutOfMemoryError as err:
        return {"status": "oom", "note": str(err).splitlines()[0][:200]}
    except MemoryError:
        return {"status": "oom", "note": "MemoryError"}
    except NotImplementedError as err:
        return {"status": "unsupported", "note": str(err).splitlines()[0][:300]}
    except Exception as err:  # a broken backend is a row, not the end of the run
        last = traceback.format_exc().strip().splitlines()[-1]
        return {"status": "error", "note": f"{type(err).__name__}: {last[:300]}"}
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _child(conn, name, shape, device, opts, threads):
    if threads:
        torch.set_num_threads(threads)
    conn.send(_measure_or_status(name, shape, device, opts))
    conn.close()


def _measure_in_child(name, shape, device, opts, timeout_s, threads=None) -> dict:
    """A forked child per case: a clean peak-RSS measure, and a crash or hang in a backend
    costs one row.  The parent must not have run torch's thread pools before forking."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_end, name, shape, device, opts, threads))
    proc.start()
    child_end.close()
    result, timed_out = None, not parent_end.poll(timeout_s)
    if not timed_out:
        try:
            result = parent_end.recv()
        except EOFError:  # the child died without answering
            pass
    if proc.is_alive():
        proc.kill()
    proc.join()
    if result is not None:
        return result
    if timed_out:
        return {"status": "timeout", "note": f"killed after {timeout_s:.0f} s"}
    if proc.exitcode == -9:  # SIGKILL from outside: the kernel's out-of-memory killer
        return {"status": "oom", "note": "child process killed (SIGKILL), likely out of memory"}
    return {"status": "error", "note": f"child process exited with code {proc.exitcode}"}


def _reference_cannot_fit(shape, device) -> str | None:
    """The reference holds at least two float32 [B, Hq, Nq, Nk] tensors (scores and
    probabilities); when even those exceed the device, say so instead of trying."""
    need = 2 * 4 * shape.batch * shape.hq * shape.nq * shape.nk
    if device == "cuda":
        have = torch.cuda.get_device_properties(0).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        return (f"needs >= {need / 2**30:.0f} GiB for two N x N float32 score tensors; "
                f"the device has {have / 2**30:.0f} GiB")
    return None


# ----------------------------------------------------------------------------- environment

def environment(device: str, threads: int | None = None) -> dict:
    """Device, versions and time: recorded with every row."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": device, "torch": torch.__version__, "lift_kernels": __version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "threads": threads or torch.get_num_threads(), "command": " ".join(sys.argv)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = ""
    try:
        env["build_info"] = build_info()
    except ImportError:
        env["build_info"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, cuda=torch.version.cuda,
                   device_memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}")
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        env["device_name"] = f"{name} ({os.cpu_count()} cores)"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["git_commit"] = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = ""
    return env


# ----------------------------------------------------------------------------- the run

def run_benchmark(shapes, backends, device, *, warmup=1, max_repeats=20, min_repeats=3,
                  target_ms=1000.0, input_sets=None, time_budget_s=None, case_timeout_s=600.0,
                  threads=None, env=None, log=print, on_case=None) -> list:
    """Every backend on every shape; returns the rows (one per shape, backend and pass).
    Cases left when `time_budget_s` is spent get status 'skipped'.  `threads`: torch's CPU
    threads in each case (default: torch's choice).  `on_case(rows)` is called after each
    case with the rows so far (ratios filled in), so a run cut short keeps its results."""
    if threads and device != "cpu":
        torch.set_num_threads(threads)
    env = env or environment(device, threads)
    if input_sets is None:
        input_sets = 3 if device == "cuda" else 2
    opts = dict(warmup=warmup, max_repeats=max_repeats, min_repeats=min_repeats,
                target_ms=target_ms, input_sets=input_sets)
    started = time.monotonic()
    rows = []
    for shape in shapes:
        for name in backends:
            spent = time.monotonic() - started
            reason = _reference_cannot_fit(shape, device) if name == "reference" else None
            if time_budget_s is not None and spent > time_budget_s:
                result = {"status": "skipped", "note": f"time budget of {time_budget_s:.0f} s spent"}
            elif reason is not None:
                result = {"status": "oom", "note": f"not attempted: {reason}"}
            elif device == "cpu":
                result = _measure_in_child(name, shape, device, opts, case_timeout_s, threads)
            else:
                result = _measure_or_status(name, shape, device, opts)
            new = _rows(name, shape, device, result, env)
            rows.extend(new)
            log(_progress_line(new))
            add_ratios(rows)
            if on_case is not None:
                on_case(rows)
    return rows


def _rows(name, shape, device, result, env) -> list:
    rows = []
    for p in PASSES:
        timing = result.get(p, {})
        ms = timing.get("ms")
        flops = attention_flops(shape, p)
        rows.append({
            "backend": name, "pass": p, "status": result["status"], "note": result.get("note", ""),
            "B": shape.batch, "Nq": shape.nq, "Nk": shape.nk, "Hq": shape.hq, "Hkv": shape.hkv,
            "D": shape.head_dim, "M": shape.mem_hidden, "R": shape.gate_hidden,
            "dtype": shape.dtype, "causal": shape.causal, "device": device,
            "device_name": env["device_name"], "ms": ms, "ms_min": timing.get("ms_min"),
            "ms_max": timing.get("ms_max"), "repeats": timing.get("repeats"),
            "tflops": flops / (ms * 1e-3) / 1e12 if ms else None, "attn_flops": flops,
            "mem_flops": 0 if name in ("sdpa", "cudnn") else memory_flops(shape, p),
            "peak_mem_bytes": timing.get("peak_mem_bytes"), "threads": env["threads"],
            "torch": env["torch"], "triton": env["triton"], "lift_kernels": env["lift_kernels"],
            "date": env["date"]})
    return rows


def _case_key(row) -> tuple:
    return tuple(row[k] for k in ("B", "Nq", "Nk", "Hq", "Hkv", "D", "dtype", "causal", "pass"))


def add_ratios(rows) -> None:
    """speedup_vs_reference / _vs_torch (their ms over this row's), time_over_sdpa and
    mem_over_sdpa (this row's over SDPA's), for rows measured in the same run."""
    by_case = {}
    for row in rows:
        if row["status"] == "ok":
            by_case.setdefault(_case_key(row), {})[row["backend"]] = row
    for row in rows:
        base = by_case.get(_case_key(row), {})
        ok = row["status"] == "ok"

        def ratio(num, den):
            return num / den if ok and num is not None and den else None

        ref, tor, sdpa = base.get("reference"), base.get("torch"), base.get("sdpa")
        row["speedup_vs_reference"] = ratio(ref and ref["ms"], row["ms"])
        row["speedup_vs_torch"] = ratio(tor and tor["ms"], row["ms"])
        row["time_over_sdpa"] = ratio(row["ms"], sdpa and sdpa["ms"])
        row["mem_over_sdpa"] = ratio(row["peak_mem_bytes"], sdpa and sdpa["peak_mem_bytes"])


# ----------------------------------------------------------------------------- output

def _fmt(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def _progress_line(rows) -> str:
    r = {row["pass"]: row for row in rows}
    head = f"  {r['fwd']['backend']:<10} {r['fwd']['dtype']} N={r['fwd']['Nq']} D={r['fwd']['D']}"
    if r["fwd"]["status"] != "ok":
        return f"{head}: {r['fwd']['status']} ({r['fwd']['note']})"
    return (f"{head}: fwd {r['fwd']['ms']:.3g} ms, bwd {r['bwd']['ms']:.3g} ms, "
            f"fwd+bwd {r['fwd_bwd']['ms']:.3g} ms")


def format_table(rows, env=None) -> str:
    """The readable table: one block per shape, one line per backend; ratios are over
    fwd+bwd time (x ref, x torch: speedups; /sdpa: time and peak memory over SDPA's)."""
    lines = []
    if env:
        lines.append(f"gated-memory attention benchmark: {env['device_name']}, torch {env['torch']}"
                     f", triton {env['triton'] or '-'}, lift_kernels {env['lift_kernels']}, "
                     f"{env['threads']} threads, {env['date']}")
    header = (f"{'backend':<10} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>9} "
              f"{'f+b TF/s':>9} {'peak MiB':>9} {'x ref':>6} {'x torch':>7} {'t/sdpa':>6} "
              f"{'m/sdpa':>6}")
    cases = {}
    for row in rows:
        cases.setdefault(_case_key(row)[:-1], {}).setdefault(row["backend"], {})[row["pass"]] = row
    for key, backends in cases.items():
        first = next(iter(backends.values()))["fwd"]
        shape = Shape(first["B"], first["Nq"], first["Nk"], first["Hq"], first["Hkv"],
                      first["D"], first["dtype"], first["causal"])
        mflop = memory_flops(shape, "fwd_bwd") / 1e9
        lines += ["", f"{shape.label()}   (memory MLP fwd+bwd: {mflop:.3g} GFLOP, "
                      f"attention: {attention_flops(shape, 'fwd_bwd') / 1e9:.3g} GFLOP)", header]
        for name, r in backends.items():
            f, b, fb = r["fwd"], r["bwd"], r["fwd_bwd"]
            if f["status"] != "ok":
                lines.append(f"{name:<10} {f['status']}: {f['note']}")
                continue
            peak = fb["peak_mem_bytes"]
            lines.append(
                f"{name:<10} {f['ms']:>9.3f} {b['ms']:>9.3f} {fb['ms']:>9.3f} "
                f"{_fmt(f['tflops']):>9} {_fmt(fb['tflops']):>9} "
                f"{_fmt(peak / 2**20 if peak is not None else None, '.1f'):>9} "
                f"{_fmt(fb['speedup_vs_reference'], '.2f'):>6} "
                f"{_fmt(fb['speedup_vs_torch'], '.2f'):>7} {_fmt(fb['time_over_sdpa'], '.2f'):>6} "
                f"{_fmt(fb['mem_over_sdpa'], '.2f'):>6}")
    return "\n".join(lines)


def write_json(path, rows, env) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path, rows, env) -> str | None:
    """Fwd+bwd time and peak memory against N, one line per backend, one row of panels per
    shape family (at most four).  Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    families = {}
    for row in rows:
        if row["pass"] == "fwd_bwd" and row["status"] == "ok" and row["Nq"] == row["Nk"]:
            shape = Shape(row["B"], row["Nq"], row["Nk"], row["Hq"], row["Hkv"], row["D"],
                          row["dtype"], row["causal"])
            families.setdefault(shape.family(), []).append(row)
    if not families:
        return "no successful rows to plot"
    chosen = sorted(families.items(), key=lambda kv: -len({r["Nq"] for r in kv[1]}))[:4]
    fig, axes = plt.subplots(len(chosen), 2, figsize=(11, 3.6 * len(chosen)), squeeze=False)
    for (family, fam_rows), (ax_t, ax_m) in zip(chosen, axes):
        b, hq, hkv, d, dtype, causal = family
        for name in dict.fromkeys(r["backend"] for r in fam_rows):
            pts = sorted((r["Nq"], r["ms"], r["peak_mem_bytes"]) for r in fam_rows
                         if r["backend"] == name)
            ns = [p[0] for p in pts]
            ax_t.plot(ns, [p[1] for p in pts], marker="o", label=name)
            ax_m.plot(ns, [p[2] / 2**20 for p in pts], marker="o", label=name)
        all_ns = sorted({r["Nq"] for r in fam_rows})
        title = f"B={b} Hq={hq} Hkv={hkv} D={d} {dtype}{' causal' if causal else ''}"
        for ax, ylabel in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory over inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ns, [str(n) for n in all_ns])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"gated-memory attention: {env['device_name']}, torch {env['torch']}, "
                 f"{env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lift-kernels bench",
        description="Time every gated-memory attention backend against reference, torch, "
                    "SDPA alone and (CUDA) FlexAttention: fwd, bwd, fwd+bwd, peak memory, "
                    "TFLOP/s.")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="the short sweep: cpu-quick on CPU (about 2 minutes on 2 cores), "
                             "gpu-target on CUDA")
    parser.add_argument("--sweep", choices=sorted(SWEEPS),
                        help="default: cpu-full on CPU, gpu on CUDA")
    parser.add_argument("--n", type=_int_list, metavar="N[,N...]",
                        help="replace the sweep's sequence lengths (Nq = Nk = N)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="replace the sweep's dtypes")
    parser.add_argument("--backends", type=lambda s: s.split(","), metavar="NAME[,NAME...]",
                        help="default: the baselines plus every available backend")
    parser.add_argument("--threads", type=int,
                        help="CPU threads: torch's and OMP_NUM_THREADS (default: all cores)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None,
                        help="most timed repeats per pass (default 10 CPU, 30 CUDA)")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--target-ms", type=float, default=None,
                        help="time to fill per pass and case (default 400 CPU, 300 CUDA)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="skip the cases left after S seconds (each gets a 'skipped' row)")
    parser.add_argument("--case-timeout", type=float, default=600.0, metavar="S",
                        help="CPU: kill a case's child process after S seconds")
    parser.add_argument("--json", metavar="FILE", help="write {environment, rows} as JSON")
    parser.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    parser.add_argument("--plot", metavar="FILE.png", help="write time and memory vs N")
    return parser


def _int_list(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def select_shapes(args, device) -> list:
    name = args.sweep or (("gpu-target" if args.quick else "gpu") if device == "cuda"
                          else ("cpu-quick" if args.quick else "cpu-full"))
    shapes = SWEEPS[name]
    if args.dtype:
        shapes = [Shape(s.batch, s.nq, s.nk, s.hq, s.hkv, s.head_dim, args.dtype, s.causal)
                  for s in shapes]
    if args.n:
        families = dict.fromkeys(s.family() for s in shapes)
        shapes = [Shape(b, n, n, hq, hkv, d, dt, c) for (b, hq, hkv, d, dt, c) in families
                  for n in args.n]
    return list(dict.fromkeys(shapes))


def limit_threads(threads) -> None:
    """torch's CPU threads, and OMP_NUM_THREADS for compiled extensions with their own
    OpenMP runtime (read when it loads, so call this before any backend is imported)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    limit_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    backends = args.backends or default_backends(device)
    known = set(BASELINES) | {b for b in BACKENDS if b != "auto"}
    unknown = [b for b in backends if b not in known]
    if unknown:
        print(f"error: unknown backend(s) {unknown}; choose from {sorted(known)}", file=sys.stderr)
        return 2
    shapes = select_shapes(args, device)
    cuda = device == "cuda"

    def save(rows):
        if args.json:
            write_json(args.json, rows, env)
        if args.csv:
            write_csv(args.csv, rows)

    no_plot = args.plot and missing_extra("plot", "--plot")
    if no_plot:  # said before the work; the table, JSON and CSV are written all the same
        print(f"{no_plot}; no plot will be written to {args.plot}", flush=True)
    env = environment(device, args.threads)
    print(f"{len(shapes)} shapes x {len(backends)} contenders ({', '.join(backends)}) on "
          f"{env['device_name']}", flush=True)
    rows = run_benchmark(
        shapes, backends, device, warmup=args.warmup,
        max_repeats=args.repeats or (30 if cuda else 10), min_repeats=args.min_repeats,
        target_ms=args.target_ms or (300.0 if cuda else 400.0), time_budget_s=args.time_budget,
        case_timeout_s=args.case_timeout, threads=args.threads, env=env,
        log=lambda line: print(line, flush=True), on_case=lambda rows: save(rows))
    print(format_table(rows, env))
    if args.plot:
        why = write_plot(args.plot, rows, env)
        if why:
            print(f"no plot written to {args.plot}: {why}")
    failed = [r for r in rows if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
