"""The SASS of the CUDA forward (bench/sass_report.py on the built _C), without a GPU: for
sm_80 and sm_90a and every (head dim, dtype), no spills and no local memory, tensor-core MMAs
(HMMA), ldmatrix (LDSM) and cp.async (LDGSTS) present, and no barrier inside the online
softmax; shared memory per block within each card's limit.  Skipped where _C has no CUDA
part or no cuobjdump is found."""

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


def _forward_kernels(report, arch):
    kernels = {sass_report.short_name(k): e for k, e in report.get(arch, {}).items()
               if "forward_kernel" in k}
    assert len(kernels) == 4, f"{arch}: forward kernels {sorted(kernels)}"
    return kernels


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_forward_sass(report, arch):
    if arch not in cext._C.build_info()["cuda_archs"].replace("80", "sm_80").replace("90a", "sm_90a"):
        pytest.skip(f"_C was built without {arch}")
    for name, e in _forward_kernels(report, arch).items():
        assert e["stack"] == 0 and e["local"] == 0, f"{arch} {name}: spills {e}"
        assert e["LDL"] == 0 and e["STL"] == 0, f"{arch} {name}: local loads/stores {e}"
        for op in ("HMMA", "LDSM", "LDGSTS", "SHFL.BFLY", "MUFU.EX2"):
            assert e[op] > 0, f"{arch} {name}: no {op}"
        assert e["softmax_no_bar"], f"{arch} {name}: a barrier inside the softmax"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [1, 2])
def test_shared_memory_within_limits(head_dim, dtype):
    """Every kernel's tiles fit sm_80 (163 KB) and sm_90a (227 KB); cards with less (sm_86/89,
    99 KB) are declined by supports() when the tiles do not fit (checked on a device)."""
    forward, backward = cext._C.cuda_smem_bytes(head_dim, dtype)
    assert 0 < forward <= 99 * 1024  # the forward fits every sm_8x/sm_90 card
    assert max(forward, backward) <= 163 * 1024
