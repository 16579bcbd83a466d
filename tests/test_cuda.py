"""The `cuda` backend (csrc/cuda via lift_kernels._C) on a GPU: against the float64 oracle,
against the `triton` backend, bit-reproducibility, and its fallbacks.

Runs where a CUDA device is present (LIFT_TEST_DEVICE=cuda forces the device, e.g. in
bench/gpu_check.sh); skipped with the reason otherwise."""

from __future__ import annotations

import os

import pytest
import torch

import lift_kernels
from lift_kernels.ops import cext
from helpers import Case, check_against_oracle, make_inputs, rel_err, run

DEVICE = os.environ.get("LIFT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="no CUDA device (set LIFT_TEST_DEVICE)"),
    pytest.mark.skipif(cext._C is None or not cext._C.build_info()["cuda"],
                       reason="lift_kernels._C was built without CUDA"),
]

BASE = Case(batch=2, nq=150, nk=150, hq=4, hkv=2, head_dim=64, dtype=torch.bfloat16)
GRID = {
    "base": BASE,
    "d128": BASE.but(head_dim=128),
    "n1": BASE.but(nq=1, nk=1),
    "nq_lt_nk": BASE.but(nq=70, nk=200),
    "nq_gt_nk": BASE.but(nq=200, nk=70),
    "mqa_bias": BASE.but(hq=4, hkv=1, bias=True),
    "no_rope_no_causal": BASE.but(rope=False, causal=False, nq=90, nk=130),
    "fp16": BASE.but(dtype=torch.float16, bias=True),
    "fp32_weights": BASE.but(weight_dtype=torch.float32),
    "long": BASE.but(batch=1, nq=1000, nk=1000, hq=2, hkv=1, head_dim=128),
    # the forward's edges: one ragged key block, rows that see no key, M of 3 chunks,
    # a custom scale, MQA at D=128 without RoPE
    "ragged_edges": BASE.but(nq=129, nk=65, mem_hidden=192, bias=True, softmax_scale=0.3),
    "mqa_d128_no_rope": BASE.but(hq=4, hkv=1, head_dim=128, rope=False, nq=64, nk=191),
    # the backward: gate exactly 1 (lse' = +inf, no attention gradient); the dK/dV kernel's
    # pipeline over several query tiles of several heads per key block, D=128 (32-row tiles)
    "gate_one": BASE.but(gate_shift=-60.0, bias=True),
    "gqa_d128_tiles": BASE.but(batch=1, nq=300, nk=257, hq=8, hkv=2, head_dim=128),
}


@pytest.mark.parametrize("name", list(GRID))
def test_cuda_matches_oracle(name):
    check_against_oracle("cuda", GRID[name], seed=len(name), device=DEVICE)


@pytest.mark.parametrize("name", ["base", "d128", "nq_gt_nk", "mqa_bias"])
def test_cuda_matches_triton(name):
    case = GRID[name]
    if lift_kernels.dispatch.unsupported_reason("triton", _problem(case)) is not None:
        pytest.skip("the triton backend cannot serve this case here")
    inputs = make_inputs(case, 3, DEVICE)
    out_c, gate_c, grads_c = run("cuda", case, inputs)
    out_t, gate_t, grads_t = run("triton", case, inputs)
    assert rel_err(out_c, out_t) < 2e-2 and rel_err(gate_c, gate_t) < 2e-2
    for n, g in grads_c.items():
        if g is not None:
            assert rel_err(g, grads_t[n]) < 2e-2, f"d{n}"


def test_cuda_deterministic_bit_identical():
    case = GRID["long"].but(hq=4, hkv=2, bias=True)
    inputs = make_inputs(case, 9, DEVICE)
    first = run("cuda", case, inputs, deterministic=True)
    second = run("cuda", case, inputs, deterministic=True)
    assert torch.equal(first[0], second[0])
    for n, g in first[2].items():
        if g is not None:
            assert torch.equal(g, second[2][n]), f"d{n} differs between runs"


def _problem(case):
    t = make_inputs(case, 0, DEVICE)
    return lift_kernels.dispatch.validate(
        *t.values(), causal=case.causal, softmax_scale=None, gate_scale=3.0, gate_shift=1.0,
        return_gate=False, backend="auto", deterministic=False)


@pytest.mark.parametrize("change", [dict(head_dim=32), dict(dtype=torch.float32),
                                    dict(mem_hidden=100), dict(gate_hidden=17)])
def test_cuda_unsupported_falls_back(change):
    """An explicit backend="cuda" raises NotImplementedError saying why; auto picks another."""
    case = BASE.but(**change)
    problem = _problem(case)
    assert cext.unsupported_reason("cuda", problem)
    t = make_inputs(case, 0, DEVICE)
    args = [t[n] for n in ("q", "k", "v", "w1", "b1", "w2", "b2", "g1", "c1", "g2")]
    with pytest.raises(NotImplementedError, match="cuda"):
        lift_kernels.gated_memory_attention(*args, cos=t["cos"], sin=t["sin"], backend="cuda")
    assert lift_kernels.dispatch.choose_backend("auto", problem) != "cuda"
