"""The op's contract (SPEC sections 1-2) on the autograd backends: numerics against the
float64 oracle, validation, empty inputs, gradcheck, torch.compile and checkpointing."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lift_kernels
from lift_kernels import GatedMemory, gated_memory_attention
from lift_kernels.ops.reference import gated_memory_attention_reference

from helpers import NAMES, Case, check_against_oracle, make_inputs, rel_err

BACKENDS = ["reference", "torch"]

GRID = [
    Case(),
    Case(batch=1, nq=1, nk=1, hq=2, hkv=1),
    Case(nq=129, nk=129, hq=3, hkv=3, head_dim=8),
    Case(nq=5, nk=33, hkv=1, bias=True),                 # Nq < Nk, MQA, biases
    Case(nq=33, nk=5, rope=False),                       # Nq > Nk: rows with no key
    Case(causal=False, bias=True, rope=False),
    Case(mem_hidden=7, gate_hidden=3, softmax_scale=0.3, gate_scale=2.0, gate_shift=-0.5),
    Case(dtype=torch.bfloat16),
    Case(dtype=torch.bfloat16, weight_dtype=torch.float32, bias=True, nq=17, nk=40),
    Case(dtype=torch.float16, nq=20, nk=20),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=repr)
def test_matches_float64_oracle(backend, case):
    check_against_oracle(backend, case, seed=hash((backend, repr(case))) % 2**31)


def test_gate_and_memory_formulas_by_hand():
    """One head, one token, no attention partner but itself: check SPEC's formula directly."""
    torch.manual_seed(0)
    d, m, r = 4, 8, 2
    q, k, v = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    w1, w2, g1, g2 = torch.randn(1, d, m), torch.randn(1, m, d), torch.randn(1, d, r), torch.randn(1, r)
    b1, b2, c1 = torch.randn(1, m), torch.randn(1, d), torch.randn(1, r)
    out, gate = gated_memory_attention(q, k, v, w1, b1, w2, b2, g1, c1, g2, return_gate=True,
                                       backend="reference")
    x = q[0, 0, 0]
    mem = torch.nn.functional.silu(x @ w1[0] + b1[0]) @ w2[0] + b2[0]
    g = torch.sigmoid(3.0 * (torch.nn.functional.silu(x @ g1[0] + c1[0]) @ g2[0] - 1.0))
    # A single key: softmax weight 1, attention output is v.
    expected = (1 - g) * v[0, 0, 0] + g * mem
    torch.testing.assert_close(gate[0, 0, 0], g)
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_rope_is_hf_rotate_half():
    """Rotating q then attending equals attending with q rotated by HF's formula."""
    case = Case(batch=1, nq=6, nk=6, hq=1, hkv=1, head_dim=8)
    t = make_inputs(case, 0)
    cos, sin = t["cos"], t["sin"]
    q = t["q"]
    half = q.shape[-1] // 2
    manual = q * cos[:, None] + torch.cat((-q[..., half:], q[..., :half]), -1) * sin[:, None]
    args = [t[n] for n in NAMES]
    out_rot = gated_memory_attention(*args, cos=cos, sin=sin, backend="reference")
    args[0] = manual
    # With the rotation done outside, the memory would read the rotated q: zero the memory
    # and gate branches' influence by comparing attention only (gate_shift huge -> gate 0).
    out_manual = gated_memory_attention(*args, backend="reference", gate_shift=1e4)
    out_rot0 = gated_memory_attention(*[t[n] for n in NAMES], cos=cos, sin=sin,
                                      backend="reference", gate_shift=1e4)
    torch.testing.assert_close(out_rot0, out_manual)
    assert rel_err(out_rot, out_rot0) > 1e-3  # the gate really blends when not pushed to 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_give_zero_attention(backend):
    """Nq > Nk with causal: the first Nq - Nk rows see no key; their attention is 0."""
    case = Case(nq=9, nk=4, gate_shift=1e4)  # gate -> 0: out is the attention part
    t = make_inputs(case, 1)
    leaves = {n: (None if t[n] is None else t[n].clone().requires_grad_()) for n in NAMES}
    out = gated_memory_attention(*(leaves[n] for n in NAMES), cos=t["cos"], sin=t["sin"],
                                 backend=backend, gate_shift=1e4)
    assert torch.isfinite(out).all()
    assert out[:, :5].abs().max().item() == 0.0
    assert out[:, 5:].abs().min().item() >= 0.0 and out[:, 5:].abs().max().item() > 0
    out.sum().backward()
    for n in NAMES:
        if leaves[n] is not None:
            assert torch.isfinite(leaves[n].grad).all(), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)])
def test_empty_inputs(backend, shape):
    b, nq, nk = shape
    case = Case(batch=b, nq=nq, nk=nk, rope=False)
    t = make_inputs(case, 0)
    out, gate = gated_memory_attention(*(t[n] for n in NAMES), return_gate=True, backend=backend)
    assert out.shape == (b, nq, case.hq, case.head_dim) and gate.shape == (b, nq, case.hq)
    assert torch.isfinite(out).all()
    if nk == 0 and b * nq:  # no key at all: the output is the gated memory alone
        mem_only, g = gated_memory_attention_reference(*(t[n] for n in NAMES), causal=False)
        torch.testing.assert_close(out, mem_only)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,nq,nk", [(True, 3, 5), (True, 5, 3), (False, 4, 4)])
def test_gradcheck_float64(backend, causal, nq, nk):
    case = Case(batch=1, nq=nq, nk=nk, hq=2, hkv=1, head_dim=4, bias=True, causal=causal,
                dtype=torch.float64)
    t = make_inputs(case, 3)
    inputs = tuple(t[n].requires_grad_() for n in NAMES)

    def fn(*args):
        out, gate = gated_memory_attention(*args, cos=t["cos"], sin=t["sin"], causal=causal,
                                           return_gate=True, backend=backend)
        return out, gate

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_nan_propagates_without_crash():
    case = Case(nq=8, nk=8)
    t = make_inputs(case, 0)
    t["q"][0, 3, 1, 0] = float("nan")
    for backend in BACKENDS:
        out = gated_memory_attention(*(t[n] for n in NAMES), cos=t["cos"], sin=t["sin"],
                                     backend=backend)
        assert torch.isnan(out[0, 3, 1]).any()      # the poisoned row is NaN ...
        assert torch.isfinite(out[1]).all()           # ... the other batch element is not


# ----------------------------------------------------------------------------- validation

def _args(case=Case(nq=6, nk=6)):
    t = make_inputs(case, 0)
    return [t[n] for n in NAMES], {"cos": t["cos"], "sin": t["sin"]}


def _bad(index_or_key, value, **extra):
    args, kw = _args()
    if isinstance(index_or_key, int):
        args[index_or_key] = value
    else:
        kw[index_or_key] = value
    kw.update(extra)
    return args, kw


BAD = [
    ("q rank", lambda: _bad(0, torch.randn(2, 6, 16)), ValueError, "q must have 4 dimensions"),
    ("q type", lambda: _bad(0, [1.0]), TypeError, "q must be a torch.Tensor"),
    ("q int", lambda: _bad(0, torch.zeros(2, 6, 4, 16, dtype=torch.int32)), TypeError, "q must be"),
    ("k dtype", lambda: _bad(1, torch.randn(2, 6, 2, 16, dtype=torch.float64)), TypeError, "k must have q's dtype"),
    ("k head dim", lambda: _bad(1, torch.randn(2, 6, 2, 8)), ValueError, "k must have shape"),
    ("k batch", lambda: _bad(1, torch.randn(3, 6, 2, 16)), ValueError, "k must have shape"),
    ("v shape", lambda: _bad(2, torch.randn(2, 5, 2, 16)), ValueError, "v must have shape"),
    ("gqa ratio", lambda: (lambda a: (a[0][:1] + [torch.randn(2, 6, 3, 16)] * 2 + a[0][3:], a[1]))(
        _args()), ValueError, "multiple of k's head count"),
    ("w1 shape", lambda: _bad(3, torch.randn(4, 15, 32)), ValueError, "w1 must have shape"),
    ("w1 rank", lambda: _bad(3, torch.randn(4, 16)), ValueError, "w1 must have 3 dimensions"),
    ("b1 shape", lambda: _bad(4, torch.randn(4, 31)), ValueError, "b1 must have shape"),
    ("w2 shape", lambda: _bad(5, torch.randn(4, 32, 15)), ValueError, "w2 must have shape"),
    ("b2 shape", lambda: _bad(6, torch.randn(3, 16)), ValueError, "b2 must have shape"),
    ("g1 shape", lambda: _bad(7, torch.randn(5, 16, 4)), ValueError, "g1 must have shape"),
    ("c1 shape", lambda: _bad(8, torch.randn(4, 5)), ValueError, "c1 must have shape"),
    ("g2 shape", lambda: _bad(9, torch.randn(4, 5)), ValueError, "g2 must have shape"),
    ("weight dtype", lambda: _bad(3, torch.randn(4, 16, 32, dtype=torch.float64)), TypeError, "w1 must be"),
    ("weight int", lambda: _bad(9, torch.zeros(4, 4, dtype=torch.int64)), TypeError, "g2 must be"),
    ("weights mixed", lambda: (lambda a: (a[0][:3] + [a[0][3].half()] + a[0][4:], a[1]))(
        _args(Case(nq=6, nk=6, dtype=torch.float16, weight_dtype=torch.float32))),
        TypeError, "share one dtype"),
    ("cos without sin", lambda: _bad("sin", None), ValueError, "cos and sin must be given together"),
    ("cos length", lambda: _bad("cos", torch.randn(5, 16)), ValueError, "cos must have shape"),
    ("sin batch", lambda: _bad("sin", torch.randn(3, 6, 16)), ValueError, "sin must have shape"),
    ("cos int", lambda: _bad("cos", torch.zeros(6, 16, dtype=torch.int64)), TypeError, "cos must be a floating"),
    ("backend", lambda: _bad("backend", "flash"), ValueError, "backend must be one of"),
    ("causal", lambda: _bad("causal", 1), TypeError, "causal must be a bool"),
    ("scale", lambda: _bad("softmax_scale", -1.0), ValueError, "softmax_scale must be positive"),
    ("scale nan", lambda: _bad("softmax_scale", float("nan")), TypeError, "softmax_scale must be a finite"),
    ("gate_scale", lambda: _bad("gate_scale", "3"), TypeError, "gate_scale must be a finite"),
    ("return_gate", lambda: _bad("return_gate", None), TypeError, "return_gate must be a bool"),
    ("deterministic", lambda: _bad("deterministic", "yes"), TypeError, "deterministic must be a bool"),
]


@pytest.mark.parametrize("name,make,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, make, error, message):
    args, kw = make()
    with pytest.raises(error, match=message):
        gated_memory_attention(*args, **kw)


def test_odd_head_dim_with_rope_is_rejected():
    case = Case(head_dim=5, rope=False, nq=3, nk=3)
    t = make_inputs(case, 0)
    cos = torch.ones(3, 5)
    with pytest.raises(ValueError, match="RoPE needs an even head dim"):
        gated_memory_attention(*(t[n] for n in NAMES), cos=cos, sin=cos)


def test_device_mismatch_is_reported():
    args, kw = _args()
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match="w1 must be on q's device"):
        gated_memory_attention(*args, **kw)


def test_explicit_backend_that_cannot_serve_says_why():
    args, kw = _args(Case(nq=6, nk=6, dtype=torch.float64))
    for backend in ("triton", "cuda", "cpu"):
        with pytest.raises(NotImplementedError, match=f"backend='{backend}' cannot serve"):
            gated_memory_attention(*args, backend=backend, **kw)


def test_auto_falls_back_and_matches():
    args, kw = _args()
    out_auto = gated_memory_attention(*args, **kw)
    out_ref = gated_memory_attention(*args, backend="reference", **kw)
    assert rel_err(out_auto, out_ref) < 1e-5


# ------------------------------------------------------------------ module, compile, checkpoint

def test_gated_memory_initialisation():
    torch.manual_seed(0)
    mod = GatedMemory(num_heads=4, head_dim=64)
    assert mod.w1.shape == (4, 64, 128) and mod.g1.shape == (4, 64, 8) and mod.g2.shape == (4, 8)
    assert mod.b1 is None and mod.b2 is None and mod.c1 is None
    assert mod.w2.abs().max() == 0 and mod.g2.abs().max() == 0
    bound = 1 / math.sqrt(64)
    assert mod.w1.abs().max() <= bound and mod.w1.abs().max() > 0.9 * bound
    q, k, v = torch.randn(2, 10, 4, 64), torch.randn(2, 10, 2, 64), torch.randn(2, 10, 2, 64)
    out, gate = mod(q, k, v, return_gate=True)
    torch.testing.assert_close(gate, torch.full_like(gate, 1 / (1 + math.exp(3.0))))
    # Zero memory output: out is (1 - 0.047) * attention.
    attn_only = gated_memory_attention(q, k, v, *mod.weights(), gate_shift=1e4)
    torch.testing.assert_close(out, attn_only * (1 - gate[..., None]))
    biased = GatedMemory(4, 64, bias=True)
    assert biased.b1.shape == (4, 128) and biased.b2.abs().max() == 0 and biased.c1.shape == (4, 8)
    n = sum(p.numel() for p in mod.parameters())
    assert n == 4 * (2 * 64 * 128 + 64 * 8 + 8)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        GatedMemory(4, 0)


def _compile_backends():
    return [b for b in lift_kernels.available_backends("cpu") if b != "reference"]


@pytest.mark.parametrize("backend", _compile_backends())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    mod = GatedMemory(4, 16)
    with torch.no_grad():
        mod.w2.normal_(0, 0.1)
        mod.g2.normal_(0, 0.5)
    case = Case(nq=12, nk=12)
    t = make_inputs(case, 0)

    def step(q, k, v):
        return mod(q, k, v, cos=t["cos"], sin=t["sin"], backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = step(t["q"], t["k"], t["v"])
    loss = compiled(t["q"], t["k"], t["v"])
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss, list(mod.parameters()))
    eager_grads = torch.autograd.grad(step(t["q"], t["k"], t["v"]), list(mod.parameters()))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", lift_kernels.available_backends("cpu"))
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(backend, use_reentrant):
    mod = GatedMemory(4, 16)
    with torch.no_grad():
        mod.w2.normal_(0, 0.1)
        mod.g2.normal_(0, 0.5)
    t = make_inputs(Case(nq=10, nk=10), 0)
    q = t["q"].requires_grad_()

    def block(x):
        return mod(x, t["k"], t["v"], cos=t["cos"], sin=t["sin"], backend=backend)

    leaves = [q, *mod.parameters()]
    block(q).square().sum().backward()
    g_plain = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    # Reentrant checkpointing only supports .backward(), so both runs use it.
    checkpoint(block, q, use_reentrant=use_reentrant).square().sum().backward()
    for leaf, expected in zip(leaves, g_plain):
        torch.testing.assert_close(leaf.grad, expected)
