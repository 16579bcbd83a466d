"""The compiled extension: what it reports about itself, and that it links no libtorch."""

import os
import shutil
import subprocess

import pytest

import lift_kernels
from lift_kernels import _C


def test_build_info_is_truthful():
    info = lift_kernels.build_info()
    assert info["version"] == lift_kernels.__version__
    assert info["compiler"]
    assert isinstance(info["openmp"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]
    else:
        assert info["cuda_archs"] == "" and _C.cuda_device_count() == 0


def test_cuda_part_builds_where_nvcc_is():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA part is not expected in this build")
    if os.environ.get("LIFT_KERNELS_CUDA") == "0":
        pytest.skip("LIFT_KERNELS_CUDA=0: the CUDA part was switched off for this build")
    assert lift_kernels.build_info()["cuda"], "nvcc is on PATH but _C has no CUDA code"


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not installed")
def test_extension_links_no_libtorch():
    needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True,
                            check=True).stdout
    libs = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "NEEDED" in line]
    assert libs and not [lib for lib in libs if "torch" in lib or "c10" in lib], libs
