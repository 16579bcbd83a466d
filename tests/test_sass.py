"""The SASS of the CUDA kernels (bench/sass_report.py on the built _C), without a GPU: for
sm_80 and sm_90a and every (head dim, dtype), the forward and the backward's two CuTe
attention kernels (dK/dV, dQ) have no spills and no local memory, tensor-core MMAs (HMMA),
ldmatrix (LDSM) and cp.async (LDGSTS); the forward has no barrier inside the online softmax;
shared memory per block within each card's limit.  Skipped where _C has no CUDA part or no
cuobjdump is found."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lift_kernels.ops import cext

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sass_report", ROOT / "bench" / "sass_report.py")
sass_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_report)

pytestmark = pytest.mark.skipif(
    cext._C is None or not cext._C.build_info()["cuda"] or sass_report.cuobjdump() is None,
    reason="needs _C built with CUDA and cuobjdump")


@pytest.fixture(scope="module")
def report():
    return sass_report.report(cext._C.__file__)


def _kernels(report, arch, base):
    kernels = {sass_report.short_name(k): e for k, e in report.get(arch, {}).items()
               if base in k}
    assert len(kernels) == 4, f"{arch}: {base} variants {sorted(kernels)}"
    return kernels


def _built(arch):
    archs = ["sm_" + a for a in cext._C.build_info()["cuda_archs"].split(",")]
    if arch not in archs:
        pytest.skip(f"_C was built without {arch}")


def _assert_tensor_core_pipeline(arch, name, e):
    for op in ("HMMA", "LDSM", "LDGSTS"):
        assert e[op] > 0, f"{arch} {name}: no {op}"
    assert e["stack"] == 0 and e["local"] == 0, f"{arch} {name}: spills {e}"
    assert e["LDL"] == 0 and e["STL"] == 0, f"{arch} {name}: local loads/stores {e}"


# The variants that spill (sm_80, D=128: 24 bytes, reloaded once per memory-MLP chunk, none
# in the attention loop; measured 2026-12-02): strict, so a mark must go when its spill does.
KNOWN_SPILL = {("sm_80", "forward_kernel D=128 bf16"), ("sm_80", "forward_kernel D=128 fp16")}
CONFIGS = [(arch, f"forward_kernel D={d} {t}") for arch in ("sm_80", "sm_90a")
           for d in (64, 128) for t in ("fp16", "bf16")]


@pytest.mark.parametrize("arch,name", [
    pytest.param(*c, marks=pytest.mark.xfail(strict=True, reason="known spill")) if c in KNOWN_SPILL
    else c for c in CONFIGS])
def test_forward_sass(report, arch, name):
    _built(arch)
    e = _kernels(report, arch, "forward_kernel")[name]
    for op in ("SHFL.BFLY", "MUFU.EX2"):
        assert e[op] > 0, f"{arch} {name}: no {op}"
    assert e["softmax_no_bar"], f"{arch} {name}: a barrier inside the softmax"
    _assert_tensor_core_pipeline(arch, name, e)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("kernel", ["dkdv_kernel", "dq_kernel"])
@pytest.mark.parametrize("variant", [f"D={d} {t}" for d in (64, 128) for t in ("fp16", "bf16")])
def test_backward_sass(report, arch, kernel, variant):
    """The backward's CuTe attention kernels: no spill anywhere, tensor cores fed by ldmatrix
    and cp.async, exponentials on the MUFU unit.  (The preprocess is still WMMA.)"""
    _built(arch)
    name = f"{kernel} {variant}"
    e = _kernels(report, arch, kernel)[name]
    assert e["MUFU.EX2"] > 0, f"{arch} {name}: no MUFU.EX2"
    _assert_tensor_core_pipeline(arch, name, e)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [1, 2])
def test_shared_memory_within_limits(head_dim, dtype):
    """Every kernel's tiles fit sm_80 (163 KB) and sm_90a (227 KB); cards with less (sm_86/89,
    99 KB) are declined by supports() when the tiles do not fit (checked on a device; the
    backward's WMMA preprocess needs 136.5 KB at D=128, its CuTe attention kernels at most
    96 KB: tests/cute_host)."""
    forward, backward = cext._C.cuda_smem_bytes(head_dim, dtype)
    assert 0 < forward <= 99 * 1024  # the forward fits every sm_8x/sm_90 card
    assert max(forward, backward) <= 163 * 1024
