"""The `cpu` backend (csrc/cpu via lift_kernels._C) against the float64 oracle, and what the
compiled module contains (CUDA code for sm_80 and sm_90a when nvcc built it)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import lift_kernels
from lift_kernels import dispatch
from lift_kernels.ops import cext
from helpers import Case, check_against_oracle, make_inputs, run

pytestmark = pytest.mark.skipif(cext._C is None, reason="lift_kernels._C is not built")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN: a value the kernel forgets to write
    shows up as a non-finite output or gradient."""
    def alloc(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(cext, "_alloc", alloc)


BASE = Case()
GRID = {
    "base": BASE,
    "n1": BASE.but(nq=1, nk=1),
    "odd": BASE.but(nq=67, nk=67, head_dim=24, mem_hidden=37, gate_hidden=3),
    "nq_lt_nk": BASE.but(nq=20, nk=70),
    "nq_gt_nk": BASE.but(nq=70, nk=20),  # the first 50 rows see no key: attn 0, lse -inf
    "gqa": BASE.but(hq=6, hkv=2),
    "mqa": BASE.but(hq=4, hkv=1),
    "bias": BASE.but(bias=True),
    "no_rope": BASE.but(rope=False),
    "no_causal": BASE.but(causal=False, nq=29, nk=53),
    "custom_mr": BASE.but(mem_hidden=40, gate_hidden=7, bias=True),
    "scales": BASE.but(softmax_scale=0.3, gate_scale=2.0, gate_shift=-0.5),
    "tiles": BASE.but(batch=1, nq=150, nk=150, hq=2, hkv=1, head_dim=64, bias=True),
    "tiles_offset": BASE.but(batch=1, nq=100, nk=190, hq=2, hkv=2, head_dim=32),
    # gate exactly 1 (float32 and float64): the attention gets no gradient, lse' = +inf
    "gate_one": BASE.but(gate_shift=-60.0, bias=True),
}


@pytest.mark.parametrize("name", list(GRID))
def test_cpu_matches_oracle_fp32(name):
    check_against_oracle("cpu", GRID[name], seed=len(name))


@pytest.mark.parametrize("name", ["base", "odd", "nq_gt_nk", "gqa", "bias", "tiles"])
def test_cpu_matches_oracle_bf16(name):
    check_against_oracle("cpu", GRID[name].but(dtype=torch.bfloat16), seed=7)


def test_cpu_fp16_and_fp32_weights():
    check_against_oracle("cpu", BASE.but(dtype=torch.float16, bias=True), seed=3)
    check_against_oracle("cpu", BASE.but(dtype=torch.bfloat16, weight_dtype=torch.float32),
                         seed=4)


def test_cpu_without_gate_gradient():
    """dgate=None: only the output carries an upstream gradient."""
    case = BASE.but(bias=True)
    inputs = make_inputs(case, 5)
    _, _, grads = run("cpu", case, inputs, grad_gate=False)
    _, _, ref = run("oracle", case, inputs, upcast=torch.float64, grad_gate=False)
    for name, g in grads.items():
        if g is not None:
            err = (g.double() - ref[name]).norm() / ref[name].norm()
            assert err < 1e-5, f"d{name}: {err:.2e}"


def test_cpu_non_contiguous_inputs():
    """q, k, v as views of [B, H, N, D] storage and a [B, Nq, D] RoPE table with a broadcast
    batch; the result equals the contiguous run."""
    case = BASE.but(bias=True)
    t = make_inputs(case, 11)
    q = t["q"].transpose(1, 2).contiguous().transpose(1, 2)
    kv = torch.stack([t["k"], t["v"]], dim=-2)  # [B, Nk, Hkv, 2, D]
    k, v = kv[..., 0, :], kv[..., 1, :]
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = t["cos"][None].expand(case.batch, -1, -1), t["sin"][None].expand(case.batch, -1, -1)
    weights = [t[n] for n in ("w1", "b1", "w2", "b2", "g1", "c1", "g2")]
    got = lift_kernels.gated_memory_attention(q, k, v, *weights, cos=cos, sin=sin, backend="cpu")
    want = lift_kernels.gated_memory_attention(t["q"], t["k"], t["v"], *weights, cos=t["cos"],
                                               sin=t["sin"], backend="cpu")
    assert torch.equal(got, want)


def test_cpu_deterministic_bit_identical():
    case = GRID["tiles"].but(hq=4, hkv=2, batch=2)
    inputs = make_inputs(case, 9)
    first = run("cpu", case, inputs, deterministic=True)
    second = run("cpu", case, inputs, deterministic=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name, g in first[2].items():
        if g is not None:
            assert torch.equal(g, second[2][name]), f"d{name} differs between runs"


def test_cpu_lse_and_empty_rows():
    """The saved log-sum-exp is that of the scaled scores; a row that sees no key has lse
    -inf and attention 0 (so the output is exactly the gated memory)."""
    case = BASE.but(nq=12, nk=5, rope=False)
    t = make_inputs(case, 2)
    args = [t[n] for n in ("q", "k", "v", "w1", "b1", "w2", "b2", "g1", "c1", "g2")]
    scale = case.head_dim ** -0.5
    out, gate, lse, attn = cext.forward("cpu", *args, None, None, True, scale, 3.0, 1.0)
    assert torch.isneginf(lse[:, :, :7]).all() and torch.isfinite(lse[:, :, 7:]).all()
    assert torch.equal(attn[:, :7], torch.zeros_like(attn[:, :7]))
    k = t["k"].repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", t["q"].double(), k.double()) * scale
    visible = torch.arange(5)[None, :] <= torch.arange(12)[:, None] - 7
    want = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)[:, :, 7:]
    assert torch.allclose(lse[:, :, 7:].double(), want, atol=1e-5)


def test_rows_16b_aligned():
    """The CUDA kernels copy rows with 16-byte cp.async: cext copies a tensor whose data
    pointer or row/head/batch stride is not 16-byte aligned, and leaves aligned ones alone."""
    t = torch.zeros(2, 5, 3, 64, dtype=torch.bfloat16)
    assert cext._rows_16b_aligned(t) is t
    offset = torch.arange(2 * 5 * 3 * 64 + 1, dtype=torch.float32).to(torch.bfloat16)[1:]
    for bad in (offset.view(2, 5, 3, 64),  # data pointer 2 bytes past an aligned one
                torch.zeros(2, 5, 3, 68, dtype=torch.bfloat16)[..., :64]):  # 136-byte heads
        fixed = cext._rows_16b_aligned(bad)
        assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, bad)
        assert all(st * 2 % 16 == 0 for st in fixed.stride()[:-1])


def test_cpu_unsupported_reasons():
    problem = dispatch.validate(*make_inputs(BASE, 0).values(), causal=True, softmax_scale=None,
                                gate_scale=3.0, gate_shift=1.0, return_gate=False,
                                backend="cpu", deterministic=False)
    assert cext.unsupported_reason("cpu", problem) is None
    assert "CUDA tensors" in cext.unsupported_reason("cuda", problem)
    assert dispatch.unsupported_reason("cpu", problem.__class__(
        **{**problem.__dict__, "dtype": torch.float64})) is not None


def _cuobjdump():
    found = sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))
    if shutil.which("cuobjdump"):
        found.insert(0, shutil.which("cuobjdump"))
    try:
        import triton
        found += glob.glob(os.path.join(os.path.dirname(triton.__file__),
                                        "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return found[0] if found else None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: no CUDA build")
def test_build_contains_sm80_and_sm90a():
    info = cext._C.build_info()
    if os.environ.get("LIFT_KERNELS_CUDA") == "0":
        pytest.skip("the build was told to skip CUDA (LIFT_KERNELS_CUDA=0)")
    assert info["cuda"], f"nvcc is on PATH but _C was built without CUDA: {info}"
    assert set(info["cuda_archs"].split(",")) >= {"80", "90a"}, info
    assert hasattr(cext._C, "cuda_forward") and hasattr(cext._C, "cuda_backward")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to list the embedded cubins")
    listing = subprocess.run([tool, "--list-elf", cext._C.__file__], capture_output=True,
                             text=True, check=True).stdout
    archs = set(re.findall(r"\.(sm_\d+a?)\.cubin", listing))
    assert {"sm_80", "sm_90a"} <= archs, listing


def test_cpu_nan_in_query_stays_in_its_row():
    """A NaN in one query row gives NaN in that row only, like the reference."""
    case = BASE.but(batch=1, nq=70, nk=70)
    t = make_inputs(case, 6)
    args = {n: t[n] for n in ("q", "k", "v", "w1", "b1", "w2", "b2", "g1", "c1", "g2")}
    clean = lift_kernels.gated_memory_attention(*args.values(), cos=t["cos"], sin=t["sin"],
                                                backend="cpu")
    args["q"] = args["q"].clone()
    args["q"][0, 66, 1, 3] = float("nan")
    out = lift_kernels.gated_memory_attention(*args.values(), cos=t["cos"], sin=t["sin"],
                                              backend="cpu")
    assert torch.isnan(out[0, 66, 1]).all()
    keep = torch.ones(out.shape, dtype=torch.bool)
    keep[0, 66, 1] = False
    assert torch.equal(out[keep], clean[keep])


@pytest.mark.parametrize("nq,expected", [(512, "cpu"), (4096, "cpu"), (1, "torch"), (511, "torch")])
def test_auto_on_cpu(nq, expected):
    """dispatch.auto_order's CPU rule (measured: bench/RESULTS.md)."""
    problem = dispatch.Problem(1, nq, 4096, 8, 2, 64, 128, 8, torch.float32, torch.float32,
                               torch.device("cpu"), False, False, False, True, True)
    assert dispatch.choose_backend("auto", problem) == expected
