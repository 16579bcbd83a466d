"""Input validation and backend choice: the one place that decides whether a call is
well-formed and which backend serves it.  Nothing here computes."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda", "cpu")
# Backends that are plain autograd graphs of PyTorch ops, called directly.
AUTOGRAD_BACKENDS = ("reference", "torch")
# Fused backends: a module with unsupported_reason(name, problem), forward(...) and
# backward(...) (contract in function.py), reached through its custom op.  A module that
# sets SUPPORTS_VARLEN = True also takes packed sequences and memory slots; a module serving
# several backends may set it to the names of those that do (cext: ("cpu",)).
FUSED_MODULES = {
    "triton": "lift_kernels.ops.triton_attention",
    "cuda": "lift_kernels.ops.cext",
    "cpu": "lift_kernels.ops.cext",
}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ORACLE_DTYPES = KERNEL_DTYPES + (torch.float64,)


@dataclass(frozen=True)
class Problem:
    """A validated call, as the backends see it."""

    batch: int
    nq: int
    nk: int
    hq: int
    hkv: int
    head_dim: int
    mem_hidden: int
    gate_hidden: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    device: torch.device
    has_mem_bias: bool  # b1
    has_out_bias: bool  # b2
    has_gate_bias: bool  # c1
    has_rope: bool
    causal: bool
    # (left, right), -1 unbounded; (-1, -1) when nothing beyond `causal` is masked (causal
    # already bounds the right side, so a causal call has right = -1 here).
    window_size: tuple = (-1, -1)
    softcap: float = 0.0  # 0: off
    # Packed variable-length input (cu_seqlens_q/k given): `batch` is the number of
    # sequences S, `nq`/`nk` are max_seqlen_q/k and these the packed row counts; else None.
    total_q: int | None = None
    total_k: int | None = None
    # Memory slots K of weights with a leading slot dimension (memory_index given), else None.
    num_slots: int | None = None

    @property
    def windowed(self) -> bool:
        return self.window_size != (-1, -1)

    @property
    def varlen(self) -> bool:
        return self.total_q is not None

    @property
    def empty(self) -> bool:
        if self.varlen:
            return 0 in (self.batch, self.total_q, self.total_k, self.hq)
        return 0 in (self.batch, self.nq, self.nk, self.hq)


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def _need_tensor(name, t, rank):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got {_describe(t)}")


def _need_shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {_describe(t)}")


def _need_number(name, x, positive=False):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TypeError(f"{name} must be a finite float, got {x!r}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be positive, got {x!r}")


def _need_bool(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {x!r}")


def normalize_window(window_size, causal: bool, nq: int, nk: int) -> tuple:
    """Checks window_size and returns it as (left, right) ints with -1 for every side that
    bounds nothing: the right side when `causal` (which bounds it at 0, as in
    FlashAttention), a left side >= Nk - 1 and a right side >= Nq - 1 (wider than the
    sequences), so that backends without windows can serve such calls."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size sides must be >= 0, or -1 for unbounded, got "
                         f"{tuple(window_size)!r}")
    if left >= nk - 1:
        left = -1
    if causal or right >= nq - 1:
        right = -1
    return (left, right)


def validate(q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, *, causal, softmax_scale,
             gate_scale, gate_shift, return_gate, backend, deterministic,
             window_size=(-1, -1), softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q=None, max_seqlen_k=None, memory_index=None) -> Problem:
    """Checks every argument of gated_memory_attention; raises TypeError/ValueError naming
    the argument with the expected and the actual value.  Returns the Problem."""
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _need_tensor(name, t, 3 if packed else 4)
    if q.dtype not in ORACLE_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 (float64 for the reference and "
                        f"torch backends), got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if packed:
        (nq, hq, d), (nk, hkv) = q.shape, k.shape[:2]
        if k.shape[2] != d:
            raise ValueError(f"k must have shape (total_k, Hkv, D={d}), got {_describe(k)}")
        batch = None
    else:
        batch, nq, hq, d = q.shape
        if k.shape[0] != batch or k.shape[3] != d:
            raise ValueError(f"k must have shape (B={batch}, Nk, Hkv, D={d}), got {_describe(k)}")
        nk, hkv = k.shape[1], k.shape[2]
    _need_shape("v", v, k.shape)
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q's head count Hq={hq} must be a multiple of k's head count Hkv={hkv}")

    # With memory_index every weight carries a leading slot dimension K.
    slots = () if memory_index is None else (_slot_count(w1),)
    for name, t, rank in (("w1", w1, 3), ("w2", w2, 3), ("g1", g1, 3), ("g2", g2, 2)):
        if isinstance(t, torch.Tensor) and t.dim() == rank + 1 and memory_index is None:
            raise ValueError(f"{name} has a leading slot dimension ({_describe(t)}): pass "
                             f"memory_index to say which slot each sequence uses")
        _need_tensor(name, t, rank + len(slots))
    mem_hidden, gate_hidden = w1.shape[-1], g1.shape[-1]
    _need_shape("w1", w1, (*slots, hq, d, mem_hidden))
    _need_shape("w2", w2, (*slots, hq, mem_hidden, d))
    _need_shape("g1", g1, (*slots, hq, d, gate_hidden))
    _need_shape("g2", g2, (*slots, hq, gate_hidden))
    optional = {"b1": (b1, (*slots, hq, mem_hidden)), "b2": (b2, (*slots, hq, d)),
                "c1": (c1, (*slots, hq, gate_hidden))}
    for name, (t, shape) in optional.items():
        if t is not None:
            _need_tensor(name, t, len(shape))
            _need_shape(name, t, shape)
    weights = {"w1": w1, "w2": w2, "g1": g1, "g2": g2}
    weights.update({n: t for n, (t, _) in optional.items() if t is not None})
    allowed = {q.dtype, torch.float32}
    weight_dtypes = set()
    for name, t in weights.items():
        if t.dtype not in allowed:
            raise TypeError(f"{name} must be {q.dtype} (q's dtype) or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        weight_dtypes.add(t.dtype)
    if len(weight_dtypes) > 1:
        raise TypeError(f"the seven weights must share one dtype, got "
                        f"{ {n: str(t.dtype) for n, t in weights.items()} }")

    varlen = {}
    if packed:
        varlen = _validate_packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        batch = varlen["batch"]
    elif max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError("max_seqlen_q/max_seqlen_k need cu_seqlens_q and cu_seqlens_k (packed "
                         "input)")
    if memory_index is not None:
        _validate_memory_index(memory_index, q, batch, slots[0], packed)

    if (cos is None) != (sin is None):
        raise ValueError(f"cos and sin must be given together, got cos={_describe(cos)} "
                         f"and sin={_describe(sin)}")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
            if packed:
                if tuple(t.shape) != (nq, d):
                    raise ValueError(f"{name} must have shape (total_q={nq}, D={d}) for packed "
                                     f"input, got {_describe(t)}")
                continue
            ok = (t.dim() == 2 and tuple(t.shape) == (nq, d)) or (
                t.dim() == 3 and t.shape[0] in (1, batch) and tuple(t.shape[1:]) == (nq, d))
            if not ok:
                raise ValueError(f"{name} must have shape (Nq={nq}, D={d}) or (B={batch}, Nq={nq}, "
                                 f"D={d}), got {_describe(t)}")
        if d % 2:
            raise ValueError(f"RoPE needs an even head dim, got D={d}")

    _need_bool("causal", causal)
    _need_bool("return_gate", return_gate)
    _need_bool("deterministic", deterministic)
    if softmax_scale is not None:
        _need_number("softmax_scale", softmax_scale, positive=True)
    _need_number("gate_scale", gate_scale)
    _need_number("gate_shift", gate_shift)
    if packed:  # from here on nq, nk are the longest sequences
        nq, nk = max_seqlen_q, max_seqlen_k
    window = normalize_window(window_size, causal, nq, nk)
    _need_number("softcap", softcap)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 turns it off), got {softcap!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    return Problem(batch, nq, nk, hq, hkv, d, mem_hidden, gate_hidden, q.dtype,
                   weight_dtypes.pop(), q.device, b1 is not None, b2 is not None,
                   c1 is not None, cos is not None, causal, window, float(softcap),
                   total_q=varlen.get("total_q"), total_k=varlen.get("total_k"),
                   num_slots=slots[0] if slots else None)


# ------------------------------------------------ packed sequences and memory slots (issue 15)

def _slot_count(w1) -> int:
    """K, the leading slot dimension every weight carries when memory_index is given."""
    _need_tensor("w1", w1, 4)
    if w1.shape[0] == 0:
        raise ValueError(f"w1 must have at least one memory slot, got {_describe(w1)}")
    return w1.shape[0]


def _host_values(t) -> list:
    """The values of a small index tensor, for the checks that need them.  Skipped (None)
    under torch.compile, where reading them would break the graph: there a bad index fails
    in the backend's own indexing instead."""
    if torch.compiler.is_compiling():
        return None
    return t.tolist()


def _validate_packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> dict:
    """cu_seqlens_q/k, max_seqlen_q/k of packed input (FlashAttention's varlen convention).
    Returns {"batch": S, "total_q", "total_k"}."""
    totals = {"q": q.shape[0], "k": k.shape[0]}
    given = {"q": cu_seqlens_q, "k": cu_seqlens_k}
    for side, cu in given.items():
        name = f"cu_seqlens_{side}"
        if cu is None:
            other = "k" if side == "q" else "q"
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must be given together, got "
                             f"cu_seqlens_{other}={_describe(given[other])} and {name}=None")
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] == 0:
            raise ValueError(f"{name} must have shape (S + 1,), got {_describe(cu)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one shape (S + 1,), got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    longest = {}
    for side, cu in given.items():
        name = f"cu_seqlens_{side}"
        limit = max_seqlen_q if side == "q" else max_seqlen_k
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise TypeError(f"max_seqlen_{side} must be a non-negative int with {name}, got "
                            f"{limit!r}")
        values = _host_values(cu)
        if values is None:
            continue
        lengths = [b - a for a, b in zip(values, values[1:])]
        if values[0] != 0 or any(n < 0 for n in lengths):
            raise ValueError(f"{name} must start at 0 and never decrease, got {values}")
        if values[-1] != totals[side]:
            raise ValueError(f"{name} must end at total_{side}={totals[side]} ({side}'s first "
                             f"dimension), got {values[-1]}")
        longest[side] = max(lengths, default=0)
        if limit < longest[side]:
            raise ValueError(f"max_seqlen_{side}={limit} is shorter than the longest sequence in "
                             f"{name} ({longest[side]})")
    return {"batch": cu_seqlens_q.shape[0] - 1, "total_q": totals["q"], "total_k": totals["k"]}


def _validate_memory_index(memory_index, q, batch, num_slots, packed):
    """memory_index: one slot in [0, K) per sequence (packed) or per batch element."""
    what = "(S,) for packed input, one slot per sequence" if packed else "(B,)"
    if not isinstance(memory_index, torch.Tensor):
        raise TypeError(f"memory_index must be a torch.Tensor, got {type(memory_index).__name__}")
    if memory_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"memory_index must be int32 or int64, got {memory_index.dtype}")
    if tuple(memory_index.shape) != (batch,):
        raise ValueError(f"memory_index must have shape {what} = ({batch},), got "
                         f"{_describe(memory_index)}")
    if memory_index.device != q.device:
        raise ValueError(f"memory_index must be on q's device {q.device}, got "
                         f"{memory_index.device}")
    values = _host_values(memory_index)
    if values is not None and any(not 0 <= i < num_slots for i in values):
        raise ValueError(f"memory_index must hold slots in [0, K={num_slots}) (K is the weights' "
                         f"leading dimension), got {values}")


def normalize_rope(cos, sin, batch, packed=False):
    """cos/sin as [B, Nq, D] float32 views (a broadcast batch has stride 0), or None.
    Packed input keeps its [total_q, D] (float32)."""
    if cos is None:
        return None, None

    def norm(t):
        t = t.float()
        if packed:
            return t
        if t.dim() == 2:
            t = t.unsqueeze(0)
        return t.expand(batch, *t.shape[1:])

    return norm(cos), norm(sin)


def unsupported_reason(name: str, problem: Problem) -> str | None:
    """Why backend `name` cannot serve `problem`, or None if it can."""
    if name in AUTOGRAD_BACKENDS:
        return None
    if problem.dtype == torch.float64:
        return f"the {name} backend computes in float32 at most; float64 is for reference/torch"
    module = FUSED_BACKENDS[name]
    if isinstance(module, str):
        return module
    if (problem.varlen or problem.num_slots is not None) and not _module_takes_varlen(
            name, module):
        return (f"the {name} backend does not take packed sequences (cu_seqlens_q/k) or memory "
                f"slots (memory_index) yet; the reference and torch backends do")
    return module.unsupported_reason(name, problem)


def takes_varlen(backend: str) -> bool:
    """Whether `backend` takes packed sequences and memory slots at all ("auto" does: it
    falls back to a backend that does), so a caller can choose another layout instead."""
    if backend == "auto" or backend in AUTOGRAD_BACKENDS:
        return True
    return _module_takes_varlen(backend, FUSED_BACKENDS.get(backend))


def _module_takes_varlen(name: str, module) -> bool:
    """The module's SUPPORTS_VARLEN for backend `name`: a bool, or the backends' names."""
    flag = getattr(module, "SUPPORTS_VARLEN", False)
    return name in flag if isinstance(flag, (tuple, list, frozenset, set)) else bool(flag)


# Below this many query rows `auto` prefers `torch` on CPU.  Measured on 2 cores
# (bench/RESULTS.md, fp32 fwd+bwd, B=1 Hq=8 Hkv=2 D=64): with one thread the fused `cpu`
# kernel was 0.63-0.66x `torch` at 128-256 rows (its per-call setup dominates), 0.94x at 512
# with half the memory, and faster from 1024 on; with two threads it was faster from 256 on.
# Decode (one row) and short prompts stay on torch.
AUTO_CPU_MIN_QUERY_ROWS = 512


def auto_order(problem: Problem) -> tuple[str, ...]:
    """The rule behind backend="auto" (the README states it and bench/ justifies it)."""
    if problem.device.type == "cuda":
        return ("triton", "cuda", "torch")
    if problem.device.type == "cpu":
        return ("cpu", "torch") if problem.nq >= AUTO_CPU_MIN_QUERY_ROWS else ("torch", "cpu")
    return ("torch",)


def choose_backend(backend: str, problem: Problem) -> str:
    """The backend that serves `problem`.  Empty problems run the reference (there is no
    work to fuse).  Raises NotImplementedError for an explicit backend that cannot serve."""
    if problem.empty:
        return "reference"
    if backend != "auto":
        reason = unsupported_reason(backend, problem)
        if reason is not None:
            raise NotImplementedError(f"backend={backend!r} cannot serve this call: {reason}")
        return backend
    for name in auto_order(problem):
        if unsupported_reason(name, problem) is None:
            return name
    return "reference"


def fused_backend(name: str):
    return FUSED_BACKENDS[name]


def _import_fused_backends() -> dict:
    """name -> module, or the reason it cannot be imported (a str)."""
    loaded = {}
    for name, path in FUSED_MODULES.items():
        try:
            loaded[name] = importlib.import_module(path)
        except Exception as err:  # a broken optional dependency must not break the import
            loaded[name] = f"the {name} backend is not available here ({type(err).__name__}: {err})"
    return loaded


# Imported once, eagerly (at the end: the backend modules may import Problem from here), so
# that torch.compile never has to trace an import when it meets the op.
FUSED_BACKENDS = _import_fused_backends()
