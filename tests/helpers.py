"""Shared test harness: random problems, the float64 oracle, norm-relative errors.

Every backend test goes through `check_against_oracle`: the backend's output, gate and all
ten gradients are compared with a float64 run of ops/reference.py on the same inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

import lift_kernels
from lift_kernels.ops.reference import gated_memory_attention_reference

NAMES = ("q", "k", "v", "w1", "b1", "w2", "b2", "g1", "c1", "g2")
# Norm-relative limits (STYLE.md): fp32 CPU backends 1e-5, tf32 dots 2e-3, 16-bit 2e-2.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class Case:
    batch: int = 2
    nq: int = 37
    nk: int = 37
    hq: int = 4
    hkv: int = 2
    head_dim: int = 16
    mem_hidden: int | None = None
    gate_hidden: int | None = None
    bias: bool = False
    rope: bool = True
    causal: bool = True
    dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype | None = None  # None: q's dtype
    softmax_scale: float | None = None
    gate_scale: float = 3.0
    gate_shift: float = 1.0
    window_size: tuple = (-1, -1)
    softcap: float = 0.0

    def but(self, **kw) -> "Case":
        return replace(self, **kw)


def rope_tables(n, d, batch=None, base=10000.0, offset=0):
    """HF-style cos/sin for positions offset..offset+n-1: [n, d] (or [batch, n, d])."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.arange(offset, offset + n, dtype=torch.float64)
    freqs = torch.outer(pos, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    if batch is not None:
        cos, sin = cos.expand(batch, n, d).contiguous(), sin.expand(batch, n, d).contiguous()
    return cos, sin


def make_inputs(case: Case, seed: int, device="cpu"):
    """Random inputs for `case`: a dict of the ten tensors plus cos/sin.  The memory's last
    layers are random (not the zero init) so every gradient path is exercised, and the gate
    logits are spread so the gate is far from 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    d = case.head_dim
    m = case.mem_hidden or 2 * d
    r = case.gate_hidden or max(1, math.isqrt(d))
    wdt = case.weight_dtype or case.dtype

    def rnd(*shape, scale=1.0, dtype=case.dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    t = {
        "q": rnd(case.batch, case.nq, case.hq, d),
        "k": rnd(case.batch, case.nk, case.hkv, d),
        "v": rnd(case.batch, case.nk, case.hkv, d),
        "w1": rnd(case.hq, d, m, scale=d ** -0.5, dtype=wdt),
        "b1": rnd(case.hq, m, scale=0.1, dtype=wdt) if case.bias else None,
        "w2": rnd(case.hq, m, d, scale=m ** -0.5, dtype=wdt),
        "b2": rnd(case.hq, d, scale=0.1, dtype=wdt) if case.bias else None,
        "g1": rnd(case.hq, d, r, scale=d ** -0.5, dtype=wdt),
        "c1": rnd(case.hq, r, scale=0.1, dtype=wdt) if case.bias else None,
        "g2": rnd(case.hq, r, scale=r ** -0.5, dtype=wdt),
    }
    if case.rope:
        cos, sin = rope_tables(case.nq, d, offset=case.nk - case.nq if case.nk > case.nq else 0)
        t["cos"], t["sin"] = cos.to(device), sin.to(device)
    else:
        t["cos"] = t["sin"] = None
    return t


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def run(backend: str, case: Case, inputs: dict, *, upcast=None, deterministic=False,
        grad_seed=1234, grad_gate=True):
    """Forward and backward of one backend.  Returns (out, gate, {name: grad}).

    `upcast` runs on copies converted to that dtype (the oracle).  The upstream gradient
    covers both outputs (out and gate), so the gate's own gradient path is checked too."""
    leaves = {}
    for name in NAMES:
        t = inputs[name]
        if t is None:
            leaves[name] = None
            continue
        t = t.detach().clone()
        if upcast is not None:
            t = t.to(upcast)
        leaves[name] = t.requires_grad_(True)
    cos, sin = inputs["cos"], inputs["sin"]
    if upcast is not None and cos is not None:
        cos, sin = cos.to(upcast), sin.to(upcast)
    fn = gated_memory_attention_reference if backend == "oracle" else None
    kwargs = dict(causal=case.causal, softmax_scale=case.softmax_scale,
                  gate_scale=case.gate_scale, gate_shift=case.gate_shift)
    if case.window_size != (-1, -1):
        kwargs["window_size"] = case.window_size
    if case.softcap:
        kwargs["softcap"] = case.softcap
    if fn is not None:
        out, gate = fn(*(leaves[n] for n in NAMES), cos, sin, **kwargs)
    else:
        out, gate = lift_kernels.gated_memory_attention(
            *(leaves[n] for n in NAMES), cos=cos, sin=sin, return_gate=True, backend=backend,
            deterministic=deterministic, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dgate = torch.randn(gate.shape, generator=gen, dtype=torch.float64)
    loss = (out.double() * dout.to(out.device)).sum()
    if grad_gate:
        loss = loss + (gate.double() * dgate.to(gate.device)).sum()
    loss.backward()
    grads = {n: (None if leaves[n] is None else leaves[n].grad) for n in NAMES}
    return out.detach(), gate.detach(), grads


def check_against_oracle(backend: str, case: Case, seed: int = 0, tol: float | None = None,
                         device="cpu", deterministic=False):
    """Asserts that `backend` matches the float64 reference on `case`: output, gate and all
    ten gradients, norm-relative error below `tol` (default by dtype), no NaN."""
    tol = TOL[case.dtype] if tol is None else tol
    inputs = make_inputs(case, seed, device)
    out, gate, grads = run(backend, case, inputs, deterministic=deterministic)
    ref_out, ref_gate, ref_grads = run("oracle", case, inputs, upcast=torch.float64)
    assert out.dtype == case.dtype and out.shape == ref_out.shape
    assert gate.dtype == torch.float32 and gate.shape == ref_gate.shape
    assert_matches(f"{backend} on {case}", (out, gate, grads), (ref_out, ref_gate, ref_grads), tol)


def assert_matches(what: str, result, expected, tol: float):
    """Asserts (out, gate, grads) against the expected triple: every gradient present exactly
    where expected, same shapes, finite, norm-relative error at most `tol`."""
    (out, gate, grads), (ref_out, ref_gate, ref_grads) = result, expected
    problems = []
    for name, a, b in [("out", out, ref_out), ("gate", gate, ref_gate)] + [
            (f"d{n}", grads[n], ref_grads[n]) for n in NAMES]:
        if b is None:
            assert a is None, f"{name}: gradient for an absent tensor"
            continue
        assert a is not None, f"{name}: no gradient"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not torch.isfinite(a).all():
            problems.append(f"{name}: non-finite values")
            continue
        err = rel_err(a, b)
        if err > tol:
            problems.append(f"{name}: rel err {err:.2e} > {tol:.0e}")
    assert not problems, f"{what}: " + "; ".join(problems)
