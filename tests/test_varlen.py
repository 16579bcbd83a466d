"""Packed variable-length sequences and per-sequence memory slots (issue 15): every backend
that serves them against a float64 oracle computed sequence by sequence with the plain op
(output, gate and every gradient), validation, the clean decline of the fused backends that
do not serve them, the custom-op plumbing, torch.compile, and the fused `cpu` kernels
(multi-tile sequences, the reference backend, determinism, their own checks).
`make test-triton-lane` runs the triton cases again under Triton 3.6."""

import math
from itertools import accumulate
from dataclasses import dataclass, replace

import pytest
import torch

import lift_kernels
from lift_kernels import dispatch, gated_memory_attention
from lift_kernels.ops import cext

import fake_fused_backend
from helpers import NAMES, TOL, assert_matches, rel_err, rope_tables

WEIGHTS = NAMES[3:]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the compiled kernels write starts as NaN: a value they forget to write
    shows up as a non-finite output or gradient."""
    def alloc(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(cext, "_alloc", alloc)


@dataclass(frozen=True)
class VCase:
    """Sequence s has lens_q[s] queries and lens_k[s] keys (lens_k None: as lens_q).
    packed=False is the 4-D layout (every sequence one batch element, equal lengths).
    slots: memory_index (None: one shared memory); num_slots: K."""

    lens_q: tuple = (3, 0, 5, 1)
    lens_k: tuple | None = None
    packed: bool = True
    slots: tuple | None = None
    num_slots: int = 1
    hq: int = 4
    hkv: int = 2
    head_dim: int = 16
    bias: bool = False
    rope: bool = True
    causal: bool = True
    dtype: torch.dtype = torch.float32
    window: tuple = (-1, -1)  # window_size
    softcap: float = 0.0

    @property
    def keys(self):
        return self.lens_q if self.lens_k is None else self.lens_k

    def but(self, **kw):
        return replace(self, **kw)


def make_varlen_inputs(case: VCase, seed: int) -> dict:
    """Random tensors of `case`, packed ([total, H, D]) or 4-D, plus the keywords."""
    gen = torch.Generator().manual_seed(seed)
    d, m, r = case.head_dim, 2 * case.head_dim, max(1, math.isqrt(case.head_dim))
    slot = () if case.slots is None else (case.num_slots,)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(case.dtype)

    tq, tk = sum(case.lens_q), sum(case.keys)
    t = {
        "q": rnd(tq, case.hq, d), "k": rnd(tk, case.hkv, d), "v": rnd(tk, case.hkv, d),
        "w1": rnd(*slot, case.hq, d, m, scale=d ** -0.5),
        "b1": rnd(*slot, case.hq, m, scale=0.1) if case.bias else None,
        "w2": rnd(*slot, case.hq, m, d, scale=m ** -0.5),
        "b2": rnd(*slot, case.hq, d, scale=0.1) if case.bias else None,
        "g1": rnd(*slot, case.hq, d, r, scale=d ** -0.5),
        "c1": rnd(*slot, case.hq, r, scale=0.1) if case.bias else None,
        "g2": rnd(*slot, case.hq, r, scale=r ** -0.5),
    }
    # Each sequence's own positions (its queries are the last of its keys when Nq < Nk).
    tables = [rope_tables(nq, d, offset=max(nk - nq, 0)) for nq, nk in zip(case.lens_q, case.keys)]
    t["cos"] = torch.cat([c for c, _ in tables]) if case.rope else None
    t["sin"] = torch.cat([s for _, s in tables]) if case.rope else None
    kw = {}
    if case.packed:
        def cu(lens):
            return torch.tensor([0, *accumulate(lens)], dtype=torch.int32)
        kw = {"cu_seqlens_q": cu(case.lens_q), "cu_seqlens_k": cu(case.keys),
              "max_seqlen_q": max(case.lens_q, default=0), "max_seqlen_k": max(case.keys, default=0)}
    else:
        b, nq, nk = len(case.lens_q), case.lens_q[0], case.keys[0]
        assert set(case.lens_q) == {nq} and set(case.keys) == {nk}
        for name in ("q", "k", "v"):
            t[name] = t[name].view(b, -1, *t[name].shape[1:])
        if case.rope:
            t["cos"], t["sin"] = t["cos"].view(b, nq, d), t["sin"].view(b, nq, d)
    if case.slots is not None:
        kw["memory_index"] = torch.tensor(case.slots, dtype=torch.int64)
    t["kw"] = kw
    return t


def _leaves(t, upcast=None):
    leaves = {}
    for n in NAMES:
        x = t[n]
        if x is not None:
            x = x.detach().clone()
            x = (x.to(upcast) if upcast else x).requires_grad_()
        leaves[n] = x
    return leaves


def _backward(out, gate, leaves, seed):
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dgate = torch.randn(gate.shape, generator=gen, dtype=torch.float64)
    ((out.double() * dout).sum() + (gate.double() * dgate).sum()).backward()
    return {n: None if x is None else x.grad for n, x in leaves.items()}


def run_backend(backend, case, t, seed=7):
    leaves = _leaves(t)
    out, gate = gated_memory_attention(
        *(leaves[n] for n in NAMES), cos=t["cos"], sin=t["sin"], causal=case.causal,
        window_size=case.window, softcap=case.softcap, return_gate=True, backend=backend,
        **t["kw"])
    return out.detach(), gate.detach(), _backward(out, gate, leaves, seed)


def run_oracle(case, t, seed=7):
    """float64, one sequence at a time through the plain (4-D, one-memory) reference op,
    with the weights of the sequence's slot."""
    leaves = _leaves(t, torch.float64)
    cos, sin = (None, None) if t["cos"] is None else (t["cos"].double(), t["sin"].double())
    if case.packed:
        cq, ck = [0, *accumulate(case.lens_q)], [0, *accumulate(case.keys)]
    outs, gates = [], []
    for s in range(len(case.lens_q)):
        if case.packed:
            qs, rows = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])

            def part(x, rows):
                return None if x is None else x[rows].unsqueeze(0)
        else:
            qs = rows = slice(s, s + 1)

            def part(x, rows):
                return None if x is None else x[rows]
        weights = [leaves[n] if case.slots is None or leaves[n] is None
                   else leaves[n][case.slots[s]] for n in WEIGHTS]
        out, gate = gated_memory_attention(
            part(leaves["q"], qs), part(leaves["k"], rows), part(leaves["v"], rows), *weights,
            cos=part(cos, qs), sin=part(sin, qs), causal=case.causal, window_size=case.window,
            softcap=case.softcap, return_gate=True, backend="reference")
        outs.append(out[0] if case.packed else out)
        gates.append(gate[0] if case.packed else gate)
    out, gate = torch.cat(outs), torch.cat(gates)
    return out.detach(), gate.detach(), _backward(out, gate, leaves, seed)


def check_varlen(backend, case, seed=0):
    t = make_varlen_inputs(case, seed)
    out, gate, grads = run_backend(backend, case, t)
    ref_out, ref_gate, ref_grads = run_oracle(case, t)
    assert out.dtype == case.dtype and out.shape == t["q"].shape
    assert gate.shape == t["q"].shape[:-1] and gate.dtype == (
        torch.float64 if case.dtype == torch.float64 else torch.float32)
    assert_matches(f"{backend} on {case}", (out, gate, grads), (ref_out, ref_gate, ref_grads),
                   TOL[case.dtype])
    if case.slots is not None:  # a slot no sequence reads gets exactly zero gradient
        for unused in set(range(case.num_slots)) - set(case.slots):
            for n in WEIGHTS:
                if grads[n] is not None:
                    assert grads[n][unused].abs().max().item() == 0.0, (n, unused)
    return out, gate, grads


GRID = [
    # Empty and length-1 sequences, Nq != Nk per sequence, shared slot 0, unused slot 3.
    VCase(lens_k=(4, 2, 5, 1), slots=(0, 2, 0, 1), num_slots=4),
    # More queries than keys (rows that see no key), a sequence with no key at all, MQA.
    VCase(lens_q=(6, 2, 3), lens_k=(3, 4, 0), hkv=1, bias=True),
    VCase(lens_q=(5, 7), lens_k=(9, 7), causal=False, rope=False, bias=True, slots=(1, 1),
          num_slots=2),
    VCase(lens_q=(1, 1, 1), lens_k=(6, 1, 3), slots=(2, 0, 1), num_slots=3, hq=2, hkv=2),
    # The 4-D layout with a slot per batch element (slot 2 unused).
    VCase(lens_q=(5, 5, 5), lens_k=(7, 7, 7), packed=False, slots=(1, 1, 0), num_slots=3,
          bias=True),
    VCase(lens_q=(4, 4), packed=False, slots=(0, 0), num_slots=1, rope=False),
    VCase(lens_k=(4, 2, 5, 1), slots=(1, 0, 1, 0), num_slots=2, dtype=torch.bfloat16),
    VCase(lens_q=(3, 6), lens_k=(5, 6), slots=(0, 1), num_slots=2, dtype=torch.float64),
    # Sliding windows and soft-capping per sequence (issue 16's keywords).
    VCase(lens_q=(6, 0, 9), lens_k=(8, 3, 9), window=(2, -1), slots=(1, 0, 1), num_slots=2),
    VCase(lens_q=(5, 7), lens_k=(7, 4), causal=False, window=(1, 2), softcap=1.5, hkv=1,
          bias=True),
]


HAS_CPU = "cpu" in lift_kernels.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="lift_kernels._C is not built")
# Every backend that serves packed sequences and memory slots on CPU tensors.
VARLEN_BACKENDS = ["reference", "torch", pytest.param("cpu", marks=needs_cpu)]


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=repr)
def test_matches_sequence_by_sequence_oracle(backend, case):
    if case.dtype == torch.float64 and backend == "cpu":
        pytest.skip("float64 is the oracle's dtype; the fused kernels compute in float32")
    check_varlen(backend, case, seed=hash((backend, repr(case))) % 2**31)


# The triton kernels (under the interpreter on CPU, 16-row tiles): the grid in float32 and
# bfloat16 (fused backends take no float64), and sequences spanning several tiles, where
# blocks past a short sequence's end must exit and slots are shared across tiles.
TRITON = "triton" in lift_kernels.available_backends()
TRITON_GRID = [c for c in GRID if c.dtype != torch.float64] + [
    VCase(lens_q=(40, 0, 21, 1), lens_k=(40, 5, 30, 1), slots=(2, 0, 2, 1), num_slots=4,
          hq=2, hkv=1, bias=True),
    VCase(lens_q=(33, 17), lens_k=(50, 17), window=(9, -1), softcap=2.0, hq=2, hkv=1,
          slots=(1, 0), num_slots=2),
]


@pytest.fixture
def poisoned_triton(monkeypatch):
    """Every buffer the triton kernels must fully write starts as NaN."""
    from lift_kernels.ops import triton_attention
    monkeypatch.setattr(triton_attention, "_new",
                        lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                dtype=dtype, device=device))


@pytest.mark.skipif(not TRITON, reason="triton is not available here")
@pytest.mark.parametrize("case", TRITON_GRID, ids=repr)
def test_triton_matches_sequence_by_sequence_oracle(poisoned_triton, case):
    check_varlen("triton", case, seed=hash(("triton", repr(case))) % 2**31)


@pytest.mark.skipif(not TRITON, reason="triton is not available here")
def test_triton_deterministic_backward_is_bit_identical(poisoned_triton):
    case = TRITON_GRID[-2]
    t = make_varlen_inputs(case, 4)
    runs = []
    for _ in range(2):
        leaves = _leaves(t)
        out, gate = gated_memory_attention(
            *(leaves[n] for n in NAMES), cos=t["cos"], sin=t["sin"], return_gate=True,
            backend="triton", deterministic=True, **t["kw"])
        runs.append((out, gate, _backward(out, gate, leaves, 5)))
    (out, gate, grads), (out2, gate2, grads2) = runs
    assert torch.equal(out, out2) and torch.equal(gate, gate2)
    for n in NAMES:
        if grads[n] is not None:
            assert torch.equal(grads[n], grads2[n]), n


def test_packed_sequences_do_not_see_each_other():
    """Changing one sequence's keys and values leaves every other sequence's output alone."""
    case = VCase(lens_k=(4, 2, 5, 1))
    t = make_varlen_inputs(case, 3)
    args = lambda t: [t[n] for n in NAMES]  # noqa: E731
    before = gated_memory_attention(*args(t), cos=t["cos"], sin=t["sin"], backend="torch",
                                    **t["kw"])
    t["k"][6:11] += 1.0  # sequence 2's keys
    t["v"][6:11] -= 2.0
    after = gated_memory_attention(*args(t), cos=t["cos"], sin=t["sin"], backend="torch",
                                   **t["kw"])
    changed = (after - before).abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [False] * 3 + [True] * 5 + [False]


def test_one_slot_with_memory_index_equals_shared_weights():
    """memory_index into K=1 slots is the plain op with that one memory."""
    case = VCase(lens_k=(4, 2, 5, 1), slots=(0, 0, 0, 0), num_slots=1, bias=True)
    t = make_varlen_inputs(case, 5)
    plain = [t[n] if n not in WEIGHTS or t[n] is None else t[n][0] for n in NAMES]
    kw = {n: x for n, x in t["kw"].items() if n != "memory_index"}
    for backend in ("reference", "torch"):
        a = gated_memory_attention(*(t[n] for n in NAMES), cos=t["cos"], sin=t["sin"],
                                   backend=backend, **t["kw"])
        b = gated_memory_attention(*plain, cos=t["cos"], sin=t["sin"], backend=backend, **kw)
        assert rel_err(a, b) < 1e-6


def test_no_sequence_at_all():
    case = VCase(lens_q=(), lens_k=(), slots=(), num_slots=2, rope=False)
    t = make_varlen_inputs(case, 0)
    for backend in ("auto", "reference", "torch"):
        out, gate = gated_memory_attention(*(t[n] for n in NAMES), return_gate=True,
                                           backend=backend, **t["kw"])
        assert out.shape == (0, 4, 16) and gate.shape == (0, 4)


# ----------------------------------------------------------------------------- validation

def _valid():
    case = VCase(lens_k=(4, 2, 5, 1), slots=(0, 2, 0, 1), num_slots=3)
    t = make_varlen_inputs(case, 0)
    return [t[n] for n in NAMES], {"cos": t["cos"], "sin": t["sin"], **t["kw"]}


def _bad(**changes):
    args, kw = _valid()
    for key, value in changes.items():
        if key in NAMES:
            args[NAMES.index(key)] = value(args[NAMES.index(key)]) if callable(value) else value
        else:
            kw[key] = value(kw[key]) if callable(value) else value
    return args, kw


def _drop(key):
    args, kw = _valid()
    del kw[key]
    return args, kw


I32 = torch.int32
BAD = [
    ("cu_k missing", lambda: _drop("cu_seqlens_k"), ValueError, "must be given together"),
    ("cu int64", lambda: _bad(cu_seqlens_q=lambda c: c.long()), TypeError, "cu_seqlens_q must be int32"),
    ("cu list", lambda: _bad(cu_seqlens_k=[0, 4, 6, 11, 12]), TypeError, "cu_seqlens_k must be a torch.Tensor"),
    ("cu rank", lambda: _bad(cu_seqlens_q=lambda c: c[None]), ValueError, r"cu_seqlens_q must have shape \(S \+ 1,\)"),
    ("cu lengths differ", lambda: _bad(cu_seqlens_k=torch.tensor([0, 4, 12], dtype=I32)), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have one shape"),
    ("cu decreasing", lambda: _bad(cu_seqlens_q=torch.tensor([0, 3, 2, 8, 9], dtype=I32)), ValueError,
     "cu_seqlens_q must start at 0 and never decrease"),
    ("cu start", lambda: _bad(cu_seqlens_k=torch.tensor([1, 4, 6, 11, 12], dtype=I32)), ValueError,
     "cu_seqlens_k must start at 0"),
    ("cu end", lambda: _bad(cu_seqlens_q=torch.tensor([0, 3, 3, 8, 8], dtype=I32)), ValueError,
     "cu_seqlens_q must end at total_q=9"),
    ("max_seqlen missing", lambda: _drop("max_seqlen_q"), TypeError, "max_seqlen_q must be a non-negative int"),
    ("max_seqlen tensor", lambda: _bad(max_seqlen_k=torch.tensor(5)), TypeError, "max_seqlen_k must be"),
    ("max_seqlen short", lambda: _bad(max_seqlen_k=4), ValueError, "max_seqlen_k=4 is shorter than the longest"),
    ("q 4-D when packed", lambda: _bad(q=lambda q: q[None]), ValueError, "q must have 3 dimensions"),
    ("k head dim", lambda: _bad(k=lambda k: k[..., :8], v=lambda v: v[..., :8]), ValueError,
     r"k must have shape \(total_k, Hkv, D=16\)"),
    ("cos packed", lambda: _bad(cos=lambda c: c[None]), ValueError, r"cos must have shape \(total_q=9, D=16\)"),
    ("index float", lambda: _bad(memory_index=lambda i: i.float()), TypeError, "memory_index must be int32 or int64"),
    ("index length", lambda: _bad(memory_index=torch.tensor([0, 1])), ValueError, r"memory_index must have shape \(S,\)"),
    ("index range", lambda: _bad(memory_index=torch.tensor([0, 3, 0, 1])), ValueError,
     r"memory_index must hold slots in \[0, K=3\)"),
    ("index negative", lambda: _bad(memory_index=torch.tensor([0, -1, 0, 1])), ValueError, "memory_index must hold"),
    ("index device", lambda: _bad(memory_index=lambda i: i.to("meta")), ValueError, "memory_index must be on q's device"),
    ("slots without index", lambda: _drop("memory_index"), ValueError, "w1 has a leading slot dimension"),
    ("index without slots", lambda: _bad(**{n: (lambda w: None if w is None else w[0]) for n in WEIGHTS}),
     ValueError, "w1 must have 4 dimensions"),
    ("slot counts differ", lambda: _bad(g2=lambda g: g[:2]), ValueError, r"g2 must have shape \(3, 4, 4\)"),
]


@pytest.mark.parametrize("name,make,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, make, error, message):
    args, kw = make()
    with pytest.raises(error, match=message):
        gated_memory_attention(*args, **kw)


def test_max_seqlen_needs_packed_input():
    case = VCase(lens_q=(4, 4), packed=False)
    t = make_varlen_inputs(case, 0)
    with pytest.raises(ValueError, match="max_seqlen_q/max_seqlen_k need cu_seqlens_q"):
        gated_memory_attention(*(t[n] for n in NAMES), max_seqlen_q=4)


# ------------------------------------------------------------------- fused backends, dispatch

@pytest.mark.parametrize("backend", ["cuda"])
def test_fused_backends_decline_cleanly(backend):
    if dispatch.takes_varlen(backend):
        pytest.skip(f"{backend} serves packed sequences (tested against the oracle above)")
    args, kw = _valid()
    with pytest.raises(NotImplementedError, match=f"backend='{backend}' cannot serve"):
        gated_memory_attention(*args, backend=backend, **kw)
    if not isinstance(dispatch.FUSED_BACKENDS[backend], str):  # importable: it is this reason
        with pytest.raises(NotImplementedError, match="does not take packed sequences"):
            gated_memory_attention(*args, backend=backend, **kw)


def test_varlen_is_declared_per_backend():
    """cpu and cuda share one module (ops/cext.py): only cpu takes packed input and slots."""
    assert dispatch.takes_varlen("cpu") and not dispatch.takes_varlen("cuda")
    assert dispatch.takes_varlen("auto") and dispatch.takes_varlen("torch")


def test_auto_picks_a_backend_that_serves_packed_input():
    args, kw = _valid()
    kw["max_seqlen_q"] = dispatch.AUTO_CPU_MIN_QUERY_ROWS
    problem = dispatch.validate(*args, kw.pop("cos"), kw.pop("sin"), causal=True,
                                softmax_scale=None, gate_scale=3.0, gate_shift=1.0,
                                return_gate=False, backend="auto", deterministic=False, **kw)
    assert problem.varlen and problem.num_slots == 3 and problem.batch == 4
    assert dispatch.choose_backend("auto", problem) == ("cpu" if HAS_CPU else "torch")


@pytest.fixture
def fake_cpu_backend(monkeypatch):
    monkeypatch.setitem(dispatch.FUSED_BACKENDS, "cpu", fake_fused_backend)
    return "cpu"


@pytest.mark.parametrize("case", [GRID[0], GRID[1], GRID[4]], ids=repr)
def test_custom_op_carries_the_keywords(fake_cpu_backend, case):
    """A fused backend that declares SUPPORTS_VARLEN gets the keywords through the custom op,
    forward and backward (a stand-in with the reference's math)."""
    check_varlen(fake_cpu_backend, case)


def _compiled_step(backend, case, t):
    leaves = _leaves(t)

    def step(q, k, v, *weights):
        out, gate = gated_memory_attention(q, k, v, *weights, cos=t["cos"], sin=t["sin"],
                                           return_gate=True, backend=backend, **t["kw"])
        return out.square().sum() + gate.sum()

    inputs = [leaves[n] for n in NAMES if leaves[n] is not None]
    positions = [i for i, n in enumerate(NAMES) if leaves[n] is not None]

    def flat(*xs):
        full = [None] * len(NAMES)
        for i, x in zip(positions, xs):
            full[i] = x
        return step(*full)

    return flat, inputs


@pytest.mark.parametrize("backend", ["torch", "fake", pytest.param("cpu", marks=needs_cpu)])
def test_torch_compile_fullgraph_with_the_keywords(backend, monkeypatch):
    if backend == "fake":
        monkeypatch.setitem(dispatch.FUSED_BACKENDS, "cpu", fake_fused_backend)
        backend = "cpu"
    torch._dynamo.reset()
    case = VCase(lens_k=(4, 2, 5, 1), slots=(0, 2, 0, 1), num_slots=3, bias=True)
    t = make_varlen_inputs(case, 11)
    fn, inputs = _compiled_step(backend, case, t)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    eager = fn(*inputs)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(fn(*inputs), inputs)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_gated_memory_module_with_slots():
    mod = lift_kernels.GatedMemory(4, 16, num_slots=3, bias=True)
    assert mod.w1.shape == (3, 4, 16, 32) and mod.c1.shape == (3, 4, 4) and mod.g2.shape == (3, 4, 4)
    assert mod.w2.abs().max() == 0 and mod.w1.abs().max() > 0
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    out, gate = mod(q, k, v, memory_index=torch.tensor([2, 0]), return_gate=True)
    torch.testing.assert_close(gate, torch.full_like(gate, 1 / (1 + math.exp(3.0))))
    with pytest.raises(ValueError, match="w1 has a leading slot dimension"):
        mod(q, k, v)
    with pytest.raises(ValueError, match="num_slots must be a positive int"):
        lift_kernels.GatedMemory(4, 16, num_slots=0)


# --------------------------------------------------------------------- the fused cpu kernels

# Sequences across several 64-row query tiles and 64-key blocks (GRID's fit in one).
CPU_TILES = [
    # Nq < Nk, Nq > Nk (rows that see no key), empty and length-1 sequences, a shared slot
    # (2) and an unused one (3), GQA.
    VCase(lens_q=(130, 0, 1, 90, 1), lens_k=(150, 5, 1, 64, 0), slots=(2, 0, 2, 1, 2),
          num_slots=4, hq=4, hkv=2, head_dim=32, bias=True),
    # A sliding window and soft-capping that cut across blocks.
    VCase(lens_q=(100, 67, 3), lens_k=(140, 67, 70), window=(40, -1), softcap=2.0,
          slots=(0, 1, 0), num_slots=2, head_dim=24),
    VCase(lens_q=(80, 129), lens_k=(129, 65), causal=False, window=(20, 30), hkv=1, rope=False),
    # The 4-D layout, a slot per batch element.
    VCase(lens_q=(70, 70, 70), lens_k=(90, 90, 90), packed=False, slots=(1, 0, 1),
          num_slots=3, head_dim=32, bias=True),
    VCase(lens_q=(96, 0, 33), lens_k=(96, 7, 40), slots=(1, 1, 0), num_slots=2,
          dtype=torch.bfloat16, head_dim=32),
]


@needs_cpu
@pytest.mark.parametrize("case", CPU_TILES, ids=repr)
def test_cpu_across_tiles_matches_oracle_and_reference(case):
    """Against the float64 oracle (check_varlen) and the reference backend's packed op in
    the same dtype."""
    seed = hash(repr(case)) % 2**31
    out, gate, grads = check_varlen("cpu", case, seed=seed)
    ref = run_backend("reference", case, make_varlen_inputs(case, seed))
    assert_matches(f"cpu vs reference on {case}", (out, gate, grads), ref, 2 * TOL[case.dtype])


@needs_cpu
@pytest.mark.parametrize("case", [GRID[0], CPU_TILES[0], CPU_TILES[1]], ids=repr)
def test_cpu_deterministic_bit_identical(case):
    t = make_varlen_inputs(case, 4)
    first = run_backend("cpu", case, t)
    for _ in range(2):
        again = run_backend("cpu", case, t)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        for n in NAMES:
            if first[2][n] is not None:
                assert torch.equal(first[2][n], again[2][n]), f"d{n} differs between runs"


@needs_cpu
def test_cpu_packed_equals_rectangular_batch():
    """Equal-length packed sequences are the 4-D batch: the same kernels, bit for bit."""
    case = VCase(lens_q=(70, 70), lens_k=(90, 90), slots=(1, 0), num_slots=2, bias=True)
    t = make_varlen_inputs(case, 8)
    rect = {**t, "kw": {"memory_index": t["kw"]["memory_index"]}}
    for n in ("q", "k", "v", "cos", "sin"):
        rect[n] = t[n].view(2, -1, *t[n].shape[1:])
    packed = run_backend("cpu", case, t)
    batched = run_backend("cpu", case.but(packed=False), rect)
    assert torch.equal(packed[0], batched[0].flatten(0, 1))
    assert torch.equal(packed[1], batched[1].flatten(0, 1))
    for n in NAMES:
        if packed[2][n] is not None:
            assert torch.equal(packed[2][n], batched[2][n].reshape(packed[2][n].shape)), n


def _cext_args(t):
    return [t[n] for n in NAMES] + [t["cos"], t["sin"], True, 0.25, 3.0, 1.0]


@needs_cpu
@pytest.mark.parametrize("field,value,message", [
    ("cu_seqlens_q", torch.tensor([0, 3, 2, 8, 9], dtype=torch.int32), "cu_seqlens_q must never decrease"),
    ("cu_seqlens_k", torch.tensor([0, 4, 6, 11, 13], dtype=torch.int32), "cu_seqlens_k must start at 0 and end"),
    ("max_seqlen_k", 4, "cu_seqlens_k must never decrease, nor step by more than max_seqlen"),
    ("memory_index", torch.tensor([0, 3, 0, 1]), r"memory_index must hold slots in \[0, num_slots\)"),
])
def test_cpu_kernels_check_sequences_themselves(field, value, message):
    """Under torch.compile dispatch cannot read the index tensors, so the compiled module
    checks them before reading through them: a ValueError, never a crash."""
    case = VCase(lens_k=(4, 2, 5, 1), slots=(0, 2, 0, 1), num_slots=3)
    t = make_varlen_inputs(case, 0)
    kw = {**t["kw"], field: value}
    with pytest.raises(ValueError, match=message):
        cext.forward("cpu", *_cext_args(t), **kw)


@needs_cpu
def test_cuda_kernels_refuse_sequences():
    """The shared module's cuda entry points take no packed input or slots (dispatch never
    sends them; a direct call is refused, not misread)."""
    if not cext._C.build_info()["cuda"]:
        pytest.skip("built without CUDA")
    case = VCase(lens_k=(4, 2, 5, 1), slots=(0, 2, 0, 1), num_slots=3)
    t = make_varlen_inputs(case, 0)
    with pytest.raises(ValueError, match="take no packed sequences or memory slots"):
        cext.forward("cuda", *_cext_args(t), **t["kw"])
