"""The `triton` backend against the float64 reference: output, gate and all ten gradients on
the grid of dtypes, head dims, sequence shapes, GQA, biases, RoPE and masks; deterministic
mode; rows that see no key; arbitrary strides; backend selection.

Device: $LIFT_TEST_DEVICE if set, else CUDA when available, else the CPU under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).  Every
kernel-written buffer is NaN-poisoned before each run, so an unwritten element fails.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

import lift_kernels
from lift_kernels import dispatch
from lift_kernels.ops.reference import gated_memory_attention_reference

from helpers import NAMES, Case, check_against_oracle, make_inputs, rel_err, rope_tables, run

triton = pytest.importorskip("triton")
from lift_kernels.ops import triton_attention  # noqa: E402  (after the importorskip)

DEVICE = os.environ.get("LIFT_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.startswith("cuda")
if not ON_GPU and not triton_attention.INTERPRETED:
    pytest.skip("CPU runs of the Triton kernels need TRITON_INTERPRET=1 before triton is "
                "imported", allow_module_level=True)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# Small enough for the interpreter (16-row tiles there, so 33 rows span three blocks).
BASE = Case(batch=1, nq=33, nk=33, hq=2, hkv=1, head_dim=32)
GRID = {
    "fp32": BASE,
    "fp32-bias": BASE.but(bias=True),
    "fp16-bias": BASE.but(dtype=F16, bias=True),
    "bf16-bias": BASE.but(dtype=BF16, bias=True),
    "bf16-fp32-weights": BASE.but(dtype=BF16, weight_dtype=F32),
    "fp16-fp32-weights-nq<nk": BASE.but(dtype=F16, weight_dtype=F32, nq=9, nk=40),
    "d64-fp16": BASE.but(head_dim=64, nq=20, nk=20, dtype=F16),
    "d96-bf16-bias": BASE.but(head_dim=96, nq=20, nk=20, dtype=BF16, bias=True),
    "d128-fp32": BASE.but(head_dim=128, nq=20, nk=20),
    "d256-bf16": BASE.but(head_dim=256, nq=18, nk=18, dtype=BF16),
    "d24-odd-width": BASE.but(head_dim=24, nq=19, nk=19),
    "n1": BASE.but(nq=1, nk=1),
    "decode-nq1": BASE.but(nq=1, nk=37, bias=True),
    "nq<nk-gqa": BASE.but(nq=7, nk=40, hq=4, hkv=2),
    "nq>nk": BASE.but(nq=40, nk=7),
    "mqa-4": BASE.but(hq=4, hkv=1, nq=20, nk=20),
    "mha": BASE.but(hq=2, hkv=2),
    "no-rope-bias": BASE.but(rope=False, bias=True),
    "non-causal": BASE.but(causal=False),
    "non-causal-nq<nk": BASE.but(causal=False, nq=9, nk=30, rope=False),
    "custom-m-r": BASE.but(mem_hidden=40, gate_hidden=3, bias=True),
    "scales": BASE.but(softmax_scale=0.3, gate_scale=2.0, gate_shift=-0.5),
    "batch2-fp16": BASE.but(batch=2, nq=17, nk=17, dtype=F16),
}
# On a GPU the real tile sizes (64-128 rows) need longer sequences to span several blocks.
GPU_GRID = {
    "gpu-bf16-d128-gqa": Case(batch=2, nq=1000, nk=1000, hq=8, hkv=2, head_dim=128, dtype=BF16),
    "gpu-fp16-d64-nq<nk": Case(batch=1, nq=300, nk=1111, hq=4, hkv=1, head_dim=64, dtype=F16,
                               bias=True),
    "gpu-bf16-d256": Case(batch=1, nq=333, nk=333, hq=2, hkv=2, head_dim=256, dtype=BF16),
    "gpu-fp32-d96-noncausal": Case(batch=1, nq=257, nk=513, hq=4, hkv=2, head_dim=96,
                                   causal=False),
    "gpu-bf16-nq>nk": Case(batch=2, nq=700, nk=129, hq=4, hkv=4, head_dim=64, dtype=BF16),
}


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must fully write starts as NaN."""
    monkeypatch.setattr(triton_attention, "_new", _poisoned)


@pytest.mark.parametrize("name", list(GRID) + (list(GPU_GRID) if ON_GPU else []))
def test_matches_reference(name):
    case = GRID.get(name) or GPU_GRID[name]
    check_against_oracle("triton", case, seed=len(name), device=DEVICE)


def test_deterministic_matches_reference_and_is_bit_identical():
    # 2 batches x 2 query tiles per head: several dq programs write the weight-gradient rows.
    case = BASE.but(batch=2, nq=20, nk=20, bias=True)
    check_against_oracle("triton", case, seed=3, device=DEVICE, deterministic=True)
    inputs = make_inputs(case, 4, DEVICE)
    first = run("triton", case, inputs, deterministic=True)
    second = run("triton", case, inputs, deterministic=True)
    for a, b in [(first[0], second[0]), (first[1], second[1])] + [
            (first[2][n], second[2][n]) for n in NAMES if first[2][n] is not None]:
        assert torch.equal(a, b)


def test_float32_dots_follow_torch_matmul_precision():
    """float32 dots are exact by default and TF32 (<= 2e-3) when torch allows it."""
    from lift_kernels.ops.triton_common import dot_precision
    q = torch.empty(0)
    previous = torch.get_float32_matmul_precision()
    try:
        assert dot_precision({"Q": q}) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision({"Q": q}) == "tf32"
        check_against_oracle("triton", BASE.but(nq=20, nk=20), seed=11, tol=2e-3, device=DEVICE)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_rows_that_see_no_key():
    """Causal with Nq > Nk: the first Nq - Nk queries see no key.  Their attention is 0 and
    their log-sum-exp -inf (never NaN); the others' log-sum-exp matches the scores'."""
    case = BASE.but(nq=40, nk=7, rope=False)
    t = make_inputs(case, 5, DEVICE)
    scale = case.head_dim ** -0.5
    out, gate, lse, attn = triton_attention.forward(
        "triton", t["q"], t["k"], t["v"], t["w1"], t["b1"], t["w2"], t["b2"], t["g1"], t["c1"],
        t["g2"], None, None, True, scale, 3.0, 1.0)
    blind = case.nq - case.nk
    assert torch.isfinite(out).all() and torch.isfinite(attn).all()
    assert (attn[:, :blind] == 0).all()
    assert torch.isneginf(lse[:, :, :blind]).all()
    k = t["k"].double().repeat_interleave(case.hq // case.hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", t["q"].double(), k) * scale
    visible = torch.arange(case.nk) <= torch.arange(case.nq)[:, None] - blind
    expected = scores.masked_fill(~visible.to(scores.device), float("-inf")).logsumexp(-1)
    assert rel_err(lse[:, :, blind:], expected[:, :, blind:]) < 1e-6


def test_per_batch_rope_positions():
    """cos/sin [B, Nq, D] with different positions per batch element (e.g. left padding)."""
    case = BASE.but(batch=2, nq=19, nk=19, bias=True)
    inputs = make_inputs(case, 9, DEVICE)
    tables = [rope_tables(case.nq, case.head_dim, offset=off) for off in (0, 5)]
    inputs["cos"] = torch.stack([c for c, _ in tables]).to(DEVICE)
    inputs["sin"] = torch.stack([s_ for _, s_ in tables]).to(DEVICE)
    out, gate, grads = run("triton", case, inputs)
    ref_out, ref_gate, ref_grads = run("oracle", case, inputs, upcast=torch.float64)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(gate, ref_gate) < 1e-5
    for n in NAMES:
        if ref_grads[n] is not None:
            assert rel_err(grads[n], ref_grads[n]) < 1e-5, n


def _strided_inputs(case: Case, seed: int):
    """Leaves with awkward layouts and the views the op receives: q transposed from
    [B, H, N, D], k and v slices of one packed tensor (v with a last-dim stride of 2), w1 and
    g1 transposed, cos/sin broadcast over the batch."""
    gen = torch.Generator().manual_seed(seed)
    b, nq, nk, hq, hkv, d = case.batch, case.nq, case.nk, case.hq, case.hkv, case.head_dim
    m, r = 2 * d, 5

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(case.dtype)

    leaves = {"q": rnd(b, hq, nq, d), "kv": rnd(b, nk, hkv, 2 * d, 2),
              "w1": rnd(hq, m, d, scale=d ** -0.5), "w2": rnd(hq, m, d, scale=m ** -0.5),
              "g1": rnd(hq, r, d, scale=d ** -0.5), "g2": rnd(hq, r, scale=r ** -0.5)}
    cos, sin = rope_tables(nq, d)

    def views(t):
        return dict(q=t["q"].transpose(1, 2), k=t["kv"][..., :d, 0], v=t["kv"][..., d:2 * d, 1],
                    w1=t["w1"].transpose(1, 2), b1=None, w2=t["w2"], b2=None,
                    g1=t["g1"].transpose(1, 2), c1=None, g2=t["g2"])

    return leaves, views, cos, sin


def test_arbitrary_strides():
    case = BASE.but(nq=21, nk=21, hq=4, hkv=2)
    leaves, views, cos, sin = _strided_inputs(case, 6)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(case.batch, case.nq, case.hq, case.head_dim, generator=gen,
                       dtype=torch.float64)
    results = {}
    for backend, dtype in (("triton", case.dtype), ("oracle", torch.float64)):
        ts = {n: t.to(DEVICE, dtype).clone().requires_grad_(True) for n, t in leaves.items()}
        v = views(ts)
        assert not v["q"].is_contiguous() and v["v"].stride(-1) == 2
        args = [v[n] for n in NAMES]
        if backend == "oracle":
            out, _ = gated_memory_attention_reference(*args, cos.to(DEVICE, dtype),
                                                      sin.to(DEVICE, dtype))
        else:
            out = lift_kernels.gated_memory_attention(
                *args, cos=cos.to(DEVICE), sin=sin.to(DEVICE).expand(case.batch, -1, -1),
                backend="triton")
        (out.double() * dout.to(DEVICE)).sum().backward()
        results[backend] = (out.detach(), {n: t.grad for n, t in ts.items()})
    (out, grads), (ref_out, ref_grads) = results["triton"], results["oracle"]
    assert rel_err(out, ref_out) < 1e-5
    for n in leaves:
        assert rel_err(grads[n], ref_grads[n]) < 1e-5, n


def test_unsupported_reasons(monkeypatch):
    problem = dispatch.validate(*(make_inputs(BASE, 0)[n] for n in NAMES), None, None,
                                causal=True, softmax_scale=None, gate_scale=3.0, gate_shift=1.0,
                                return_gate=False, backend="triton", deterministic=False)
    assert triton_attention.unsupported_reason("triton", problem) is None
    assert "head dim" in triton_attention.unsupported_reason(
        "triton", replace(problem, head_dim=512))
    on_gpu = replace(problem, device=torch.device("cuda", 0), head_dim=256)
    assert "float32" in triton_attention.unsupported_reason("triton", on_gpu)
    assert triton_attention.unsupported_reason(
        "triton", replace(on_gpu, dtype=torch.bfloat16)) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in triton_attention.unsupported_reason("triton", problem)
    monkeypatch.setattr(triton_attention, "triton", None)
    assert triton_attention.unsupported_reason("triton", problem) == "triton is not installed"


def test_auto_prefers_triton_on_cuda():
    problem = dispatch.validate(*(make_inputs(BASE, 0)[n] for n in NAMES), None, None,
                                causal=True, softmax_scale=None, gate_scale=3.0, gate_shift=1.0,
                                return_gate=False, backend="auto", deterministic=False)
    on_cuda = replace(problem, device=torch.device("cuda", 0))
    assert dispatch.auto_order(on_cuda)[0] == "triton"
    assert dispatch.choose_backend("auto", on_cuda) == "triton"


@pytest.mark.skipif(not ON_GPU, reason="needs > 2^31-element tensors (about 40 GB on a GPU)")
def test_offsets_past_2_to_the_31():
    """q/k/v/out past 2^31 elements: the last batch element (whose offsets overflow int32)
    matches the reference run on that element alone."""
    d, n, h = 64, 128, 1
    batch = 2 ** 31 // (n * h * d) + 2
    case = Case(batch=batch, nq=n, nk=n, hq=h, hkv=h, head_dim=d, dtype=BF16, rope=False)
    small = make_inputs(case.but(batch=2), 8, DEVICE)
    t = dict(small)
    for name in ("q", "k", "v"):
        t[name] = small[name][:1].expand(batch, -1, -1, -1).contiguous()
        t[name][-2:] = small[name]
    scale = d ** -0.5
    out, gate, lse, attn = triton_attention.forward(
        "triton", t["q"], t["k"], t["v"], t["w1"], None, t["w2"], None, t["g1"], None, t["g2"],
        None, None, True, scale, 3.0, 1.0)
    ref_out, ref_gate = gated_memory_attention_reference(
        *(small[n_] for n_ in NAMES), causal=True, softmax_scale=scale)
    assert rel_err(out[-2:], ref_out) < 2e-2 and rel_err(gate[-2:], ref_gate) < 2e-2
    dout = torch.randn_like(out)
    grads = triton_attention.backward(
        "triton", dout, None, t["q"], t["k"], t["v"], t["w1"], None, t["w2"], None, t["g1"],
        None, t["g2"], None, None, gate, lse, attn, True, scale, 3.0, 1.0, False)
    leaves = {n_: small[n_].detach().clone().requires_grad_(True) for n_ in ("q", "k", "v")}
    ref, _ = gated_memory_attention_reference(
        leaves["q"], leaves["k"], leaves["v"], small["w1"], None, small["w2"], None, small["g1"],
        None, small["g2"], causal=True, softmax_scale=scale)
    (ref.float() * dout[-2:].float()).sum().backward()
    for i, n_ in enumerate(("q", "k", "v")):
        assert rel_err(grads[i][-2:], leaves[n_].grad) < 2e-2, n_
