"""The GPU launch path of the `triton` backend, run on the CPU under the interpreter: the
autotuners with every GPU configuration (pruned per head dim as on the GPU), the grids and the deterministic mode's first configuration, with absent (None) biases as in
LIFT's default.  The timing is replaced by a stand-in that runs each configuration once and
keeps its outputs, so every configuration is checked, not only the winner.

`make test` runs this file under the newest Triton and again under the GPU image's Triton
(`make test-triton-lane`).
"""

from __future__ import annotations

import pytest
import torch

from helpers import TOL, Case, check_against_oracle, rel_err

triton = pytest.importorskip("triton")
from lift_kernels.ops import triton_attention, triton_bwd, triton_common, triton_fwd  # noqa: E402

if torch.cuda.is_available() or not triton_common.INTERPRETED:
    pytest.skip("the interpreter's run of the GPU configurations", allow_module_level=True)

BASE = Case(batch=1, nq=70, nk=70, hq=4, hkv=2, head_dim=32)
# Outputs each kernel writes (or accumulates into), by argument name.
OUTPUTS = {"fwd": ("OUT", "ATTN", "GATE", "LSE"), "dkdv": ("DK", "DV"),
           "dq": ("DQ", "HID", "GACT", "GHID", "GZ")}


class EveryConfig:
    """A stand-in for the autotuner's benchmark: runs the configuration once, keeps the
    outputs, and reports timings that make the last configuration win."""

    def __init__(self, kind):
        self.kind, self.tuner, self.runs = kind, None, []

    def __call__(self, kernel_call, quantiles):
        kernel_call()
        self.runs.append({n: self.tuner.nargs[n].clone() for n in OUTPUTS[self.kind]
                          if self.tuner.nargs.get(n) is not None})
        return [-float(len(self.runs))] * len(quantiles)


@pytest.fixture
def gpu_tuned(monkeypatch):
    """The backend's kernels autotuned over the GPU configuration lists."""
    benches = {}
    for kind, name, kernel, key in (
            ("fwd", "gated_attention_fwd_kernel", triton_fwd.fwd_kernel, triton_fwd.FWD_KEY),
            ("dkdv", "dkdv_kernel_tuned", triton_bwd.dkdv_kernel, triton_bwd.DKDV_KEY),
            ("dq", "dq_kernel_tuned", triton_bwd.dq_kernel, triton_bwd.DQ_KEY)):
        bench = benches[kind] = EveryConfig(kind)
        tuner = triton_common.autotuned(kernel, kind, triton_common.gpu_configs(kind), key,
                                        do_bench=bench)
        bench.tuner = tuner
        monkeypatch.setattr(triton_attention, name, tuner)
    monkeypatch.setattr(triton_attention, "configs", triton_common.gpu_configs)
    return benches


@pytest.mark.parametrize("dtype,bias,extra", [
    (torch.bfloat16, False, {}), (torch.float32, True, {}),
    # the window's block bounds at every GPU tile size (the other tests use 16-row tiles)
    (torch.bfloat16, False, dict(window_size=(23, -1), softcap=4.0))],
    ids=["bf16-no-bias", "fp32-bias", "bf16-window-softcap"])
def test_every_gpu_config_through_the_autotuner(gpu_tuned, dtype, bias, extra):
    """Each configuration's outputs agree with the winner's (the last), and the winner's
    output and gradients with the float64 reference (float32 keeps only the small
    single-stage tiles, bfloat16 every tile of the head dim's list).  Without biases this
    failed under Triton 3.6 while the dq kernel's autotuner had reset_to_zero, which
    called .zero_() on the None bias gradients."""
    case = BASE.but(dtype=dtype, bias=bias, **extra)
    check_against_oracle("triton", case, seed=21, device="cpu")
    q = torch.empty(0, dtype=dtype)
    timed = 0
    for kind, bench in gpu_tuned.items():
        pruned = triton_common.prune_configs(kind, triton_common.gpu_configs(kind), {"Q": q},
                                             HEAD_DIM=case.head_dim)
        # When pruning leaves one configuration, Triton 3.9 times nothing, 3.6 times it.
        assert len(bench.runs) == len(pruned) or len(pruned) == 1 >= len(bench.runs), kind
        for config, run in zip(pruned, bench.runs):
            for name, value in run.items():
                assert rel_err(value, bench.runs[-1][name]) < TOL[dtype], (kind, config, name)
        timed += len(bench.runs)
    assert timed > 1


def test_deterministic_mode_with_the_first_gpu_config(gpu_tuned):
    case = BASE.but(batch=2, nq=150, nk=150, hq=2, hkv=1, bias=True)
    check_against_oracle("triton", case, seed=22, device="cpu", deterministic=True)
