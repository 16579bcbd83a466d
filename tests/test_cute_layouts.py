"""Host-side proofs of the CUDA forward's and backward's CuTe layouts, without a GPU:
tests/cute_host/layouts.cpp (fragment coordinates, the accumulator -> A operand register
reuse (P; the backward's P'^T and dS^T) being an identity, bank-conflict-free shared-memory
accesses per warp including the backward's transposed ldmatrix reads, exact tile coverage of
ragged edges, the causal key-block split and the dK/dV kernel's query-tile range against
brute force, the dQ epilogue's RoPE pairs in one thread), compiled host-only by nvcc
against csrc/cuda/kernel_traits.h, bwd_traits.h and the nvidia-cutlass headers, and run.  Skipped where nvcc or the headers are absent (then
_C has no CUDA part either)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cutlass_include() -> Path | None:
    # The same lookup as CMakeLists.txt: the package's headers, without importing it.
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return path if (path / "cute" / "tensor.hpp").exists() else None


def test_cute_layouts_on_host(tmp_path):
    nvcc, include = shutil.which("nvcc"), _cutlass_include()
    if nvcc is None or include is None:
        pytest.skip(f"needs nvcc ({nvcc}) and the nvidia-cutlass headers ({include})")
    exe = tmp_path / "layouts"
    # nvcc as the host compiler driver: it adds the CUDA toolkit's headers that CuTe includes.
    subprocess.run([nvcc, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", "-isystem", str(include),
                    str(ROOT / "tests" / "cute_host" / "layouts.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("ok "), result.stdout
    for config in ("D=64 fp16", "D=128 fp16", "D=64 bf16", "D=128 bf16"):
        assert f"{config}: smem" in result.stdout
        assert f"{config} backward:" in result.stdout
