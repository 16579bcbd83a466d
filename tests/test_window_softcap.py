"""Sliding windows (window_size, FlashAttention's convention) and soft-capping (softcap) on
every backend that serves them: the float64 oracle, all gradients, GQA, Nq != Nk, rows that
see no key, validation, and the backends that decline them.  The fused backends also: blocks
wholly outside the window are never read, and the backward is bit-reproducible.

`make test-triton-lane` runs the triton cases again under Triton 3.6."""

import pytest
import torch

import lift_kernels
from lift_kernels import GatedMemory, dispatch, gated_memory_attention
from lift_kernels.ops.reference import gated_memory_attention_reference, visible_mask

from helpers import NAMES, Case, check_against_oracle, make_inputs, rel_err, run

FUSED = [b for b in ("cpu", "triton") if b in lift_kernels.available_backends()]
BACKENDS = ["reference", "torch"] + FUSED

W = Case(nq=37, nk=37)
GRID = [
    W.but(window_size=(5, -1)),                                  # causal + left window
    W.but(window_size=(0, -1)),                                  # each row sees its own key
    W.but(window_size=(4, 3), causal=False, bias=True),          # symmetric-ish local
    W.but(window_size=(-1, 2), causal=False, rope=False),        # right bound only
    W.but(window_size=(6, -1), nq=9, nk=40, hkv=1),              # Nq < Nk, MQA
    W.but(window_size=(3, 1), causal=False, nq=30, nk=8),        # Nq > Nk: rows see no key
    W.but(softcap=2.5),
    W.but(softcap=1.0, causal=False, hq=6, hkv=3, bias=True),
    W.but(softcap=3.0, window_size=(7, -1), softmax_scale=0.4, nq=12, nk=25),
    # several 64-row tiles and key blocks: whole blocks skipped in forward and backward
    Case(batch=1, nq=200, nk=200, hq=2, hkv=1, window_size=(70, -1), softcap=4.0),
    Case(batch=1, nq=150, nk=300, hq=2, hkv=2, window_size=(65, 40), causal=False),
    W.but(window_size=(8, -1), softcap=5.0, dtype=torch.bfloat16),
    W.but(window_size=(2, 2), causal=False, dtype=torch.float16, weight_dtype=torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=repr)
def test_matches_float64_oracle(backend, case):
    check_against_oracle(backend, case, seed=hash((backend, repr(case))) % 2**31)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(7, 7), (4, 9), (9, 4)])
@pytest.mark.parametrize("window", [(-1, -1), (0, -1), (2, -1), (-1, 1), (3, 0), (1, 2)])
def test_visible_mask_is_flash_attention_convention(causal, nq, nk, window):
    """Element by element: query i sees key j iff i + nk - nq - left <= j <= i + nk - nq +
    right (-1 unbounded), the right side 0 when causal."""
    left, right = window
    expected = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            d = i + nk - nq
            right_ok = j <= d if causal else (right < 0 or j <= d + right)
            expected[i, j] = (left < 0 or j >= d - left) and right_ok
    got = visible_mask(nq, nk, causal, window)
    assert torch.equal(got if got is not None else torch.ones(nq, nk, dtype=torch.bool),
                       expected)


def test_softcap_formula_by_hand():
    """Two keys, gate shut: attention weights are softmax(cap * tanh(scale q.k / cap))."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    w1, w2 = torch.randn(1, 4, 8, dtype=torch.float64), torch.randn(1, 8, 4, dtype=torch.float64)
    g1, g2 = torch.randn(1, 4, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    cap, scale = 0.7, 0.9
    out = gated_memory_attention(q * 5, k, v, w1, None, w2, None, g1, None, g2, causal=False,
                                 softmax_scale=scale, softcap=cap, gate_shift=1e4,
                                 backend="reference")
    scores = cap * torch.tanh(scale * (q[0, :, 0] * 5) @ k[0, :, 0].T / cap)
    expected = torch.softmax(scores, dim=-1) @ v[0, :, 0]
    torch.testing.assert_close(out[0, :, 0], expected)
    plain = gated_memory_attention(q * 5, k, v, w1, None, w2, None, g1, None, g2, causal=False,
                                   softmax_scale=scale, gate_shift=1e4, backend="reference")
    assert rel_err(plain, out) > 1e-2  # the cap really changes the result


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_ignores_the_right_side_and_wide_windows_change_nothing(backend):
    case = W.but(nq=20, nk=26)
    t = make_inputs(case, 5)
    args = [t[n] for n in NAMES]
    kw = dict(cos=t["cos"], sin=t["sin"], backend=backend)
    plain = gated_memory_attention(*args, **kw)
    assert torch.equal(gated_memory_attention(*args, window_size=(-1, 4), **kw), plain)
    wide = gated_memory_attention(*args, window_size=(26, 26), **kw)
    assert rel_err(wide, plain) <= 1e-6
    narrow = gated_memory_attention(*args, window_size=(3, -1), **kw)
    assert rel_err(narrow, plain) > 1e-2


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(backend):
    case = Case(batch=1, nq=5, nk=7, hq=2, hkv=1, head_dim=4, bias=True, dtype=torch.float64)
    t = make_inputs(case, 3)
    inputs = tuple(t[n].requires_grad_() for n in NAMES)

    def fn(*args):
        return gated_memory_attention(*args, cos=t["cos"], sin=t["sin"], window_size=(2, -1),
                                      softcap=1.5, return_gate=True, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# Several tiles of each backend (64 rows on cpu, 16 under the Triton interpreter).
REPRODUCIBLE = {"cpu": Case(batch=2, nq=130, nk=130, hq=4, hkv=2, window_size=(50, -1),
                            softcap=3.0),
                "triton": Case(batch=2, nq=40, nk=40, hq=2, hkv=1, window_size=(20, -1),
                               softcap=3.0, bias=True)}


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backward_is_bit_reproducible(backend):
    case = REPRODUCIBLE[backend]
    check_against_oracle(backend, case, seed=12, deterministic=True)
    inputs = make_inputs(case, 11)
    first = run(backend, case, inputs, deterministic=True)[2]
    second = run(backend, case, inputs, deterministic=True)[2]
    for name in NAMES:
        if first[name] is not None:
            assert torch.equal(first[name], second[name]), name


@pytest.mark.skipif("triton" not in FUSED, reason="triton is not available here")
@pytest.mark.parametrize("window,causal", [((0, 0), False), ((2, 1), False), ((100, 100), False),
                                           ((100, -1), True), ((0, -1), True)])
def test_triton_kernels_take_any_window_side(window, causal):
    """The kernels called directly (dispatch turns sides >= N - 1 into -1 before they get
    there): sides 0, small, and wider than the sequences, forward and every gradient."""
    from lift_kernels.ops import triton_attention
    case = Case(batch=1, nq=21, nk=34, hq=2, hkv=1, causal=causal, softcap=2.0, bias=True)
    t = make_inputs(case, 13)
    scale = case.head_dim ** -0.5
    leaves = {n: None if t[n] is None else t[n].clone().requires_grad_() for n in NAMES}
    out, gate = gated_memory_attention_reference(
        *(leaves[n] for n in NAMES), t["cos"].double(), t["sin"].double(), causal=causal,
        window_size=window, softcap=case.softcap)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    (out.double() * dout).sum().backward()
    cos, sin = t["cos"].expand(1, -1, -1), t["sin"].expand(1, -1, -1)
    args = [t[n] for n in NAMES] + [cos, sin, causal, scale, 3.0, 1.0]
    got, got_gate, lse, attn = triton_attention.forward("triton", *args, window_size=window,
                                                        softcap=case.softcap)
    grads = triton_attention.backward(
        "triton", dout.float(), None, *args[:12], got_gate, lse, attn, causal, scale, 3.0, 1.0,
        False, window_size=window, softcap=case.softcap)
    assert rel_err(got, out) < 1e-5 and rel_err(got_gate, gate) < 1e-5
    for name, grad in zip(NAMES, grads):
        if leaves[name] is not None:
            assert rel_err(grad, leaves[name].grad) < 1e-5, name


@pytest.mark.skipif("triton" not in FUSED, reason="triton is not available here")
def test_triton_never_reads_blocks_outside_the_window():
    """Cost grows with the window: NaN in keys/values (forward, dq) or in queries and dO
    (dK/dV) that no row of a tile can see never reaches that tile, which a loop over every
    block with a mask would let through (0 * NaN).  16-row tiles under the interpreter."""
    from lift_kernels.ops import triton_attention
    n, left = 96, 20
    case = Case(batch=1, nq=n, nk=n, hq=2, hkv=1, rope=False)
    t = make_inputs(case, 14)
    scale = case.head_dim ** -0.5
    settings = (True, scale, 3.0, 1.0)
    for name in ("k", "v"):
        t[name][:, :16] = float("nan")  # the first key block
    args = [t[x] for x in NAMES] + [None, None]
    out, gate, lse, attn = triton_attention.forward("triton", *args, *settings,
                                                    window_size=(left, -1))
    dout = torch.randn_like(out)
    dq = triton_attention.backward("triton", dout, None, *args, gate, lse, attn, *settings,
                                   False, window_size=(left, -1))[0]
    # The tile of rows [m, m + 16) reads key blocks from (m - left) // 16 on: from m = 48 on
    # not the first one.
    first_clean = 48
    assert torch.isnan(out[:, :16]).all()
    assert torch.isfinite(out[:, first_clean:]).all() and torch.isfinite(dq[:, first_clean:]).all()

    t = make_inputs(case, 15)
    args = [t[x] for x in NAMES] + [None, None]
    out, gate, lse, attn = triton_attention.forward("triton", *args, *settings,
                                                    window_size=(left, -1))
    dout = torch.randn_like(out)
    dout[:, -16:] = float("nan")  # the last query block's upstream gradient
    dk, dv = triton_attention.backward("triton", dout, None, *args, gate, lse, attn, *settings,
                                       False, window_size=(left, -1))[1:3]
    # The key block [s, s + 16) is read by the query tiles up to row s + 15 + left: those
    # with s + 15 + left < 80 (s <= 32) never read the last tile.
    last_clean = 48
    assert torch.isnan(dk[:, -1]).all()
    assert torch.isfinite(dk[:, :last_clean]).all() and torch.isfinite(dv[:, :last_clean]).all()


def _problem(**kw):
    t = make_inputs(Case(nq=6, nk=6), 0)
    return dispatch.validate(*(t[n] for n in NAMES), t["cos"], t["sin"], causal=True,
                             softmax_scale=None, gate_scale=3.0, gate_shift=1.0,
                             return_gate=False, backend="auto", deterministic=False, **kw)


@pytest.mark.parametrize("kw", [dict(window_size=(4, -1)), dict(softcap=2.0)])
def test_backends_without_the_features_decline_and_auto_falls_back(kw):
    problem = _problem(**kw)
    assert dispatch.unsupported_reason("cuda", problem) is not None
    assert dispatch.choose_backend("auto", problem) in ("cpu", "torch")
    for name in FUSED:  # those that serve the plain call serve this one too
        assert dispatch.unsupported_reason(name, problem) is None, name


def test_window_is_normalised():
    assert _problem().window_size == (-1, -1) and not _problem().windowed
    assert _problem(window_size=(-1, 0)).window_size == (-1, -1)  # causal already bounds it
    assert _problem(window_size=[3, 5]).window_size == (3, -1)
    # Nq = Nk = 6: a side of 5 or more bounds nothing
    assert _problem(window_size=(5, -1)).window_size == (-1, -1)
    assert _problem(window_size=(4, -1)).window_size == (4, -1)


BAD = [
    (dict(window_size=4), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(1, 2, 3)), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(1.0, -1)), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(True, -1)), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(-2, -1)), ValueError, "window_size sides must be >= 0, or -1"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(softcap=float("inf")), TypeError, "softcap must be a finite float"),
    (dict(softcap="30"), TypeError, "softcap must be a finite float"),
]


@pytest.mark.parametrize("kw,error,message", BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_input_names_the_argument(kw, error, message):
    t = make_inputs(Case(nq=6, nk=6), 0)
    with pytest.raises(error, match=message):
        gated_memory_attention(*(t[n] for n in NAMES), cos=t["cos"], sin=t["sin"], **kw)


def test_gated_memory_module_passes_window_and_softcap():
    """GatedMemory.forward hands window_size and softcap to the op unchanged."""
    mod = GatedMemory(4, 16)
    with torch.no_grad():
        mod.w2.normal_(0, 0.1)
        mod.g2.normal_(0, 0.5)
    t = make_inputs(Case(nq=11, nk=11), 0)
    kw = dict(cos=t["cos"], sin=t["sin"], window_size=(3, 0), softcap=5.0, backend="reference")
    out = mod(t["q"], t["k"], t["v"], **kw)
    expected = gated_memory_attention(
        t["q"], t["k"], t["v"], *mod.weights(), gate_scale=mod.gate_scale,
        gate_shift=mod.gate_shift, **kw)
    plain = mod(t["q"], t["k"], t["v"], cos=t["cos"], sin=t["sin"], backend="reference")
    assert torch.equal(out, expected)
    assert not torch.allclose(out, plain)  # the window and the cap changed the answer
