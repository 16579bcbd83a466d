"""Builds lift_kernels._C with CMake (ninja generator, pybind11).

Environment: LIFT_KERNELS_CUDA=0/1 forces the CUDA part off/on (default: on when nvcc is
found); LIFT_KERNELS_CUDA_ARCHS="80;90a" picks the architectures; MAX_JOBS caps parallelism.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def read_version() -> str:
    text = (ROOT / "lift_kernels" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A persistent build folder in the tree: `pip install -e .` and later rebuilds reuse
        # the CMake cache and rebuild only what changed.
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLIFT_KERNELS_VERSION={read_version()}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G", "Ninja",
        ]
        cuda = os.environ.get("LIFT_KERNELS_CUDA")
        if cuda is not None:
            args.append(f"-DLIFT_KERNELS_CUDA={'ON' if cuda == '1' else 'OFF'}")
        if os.environ.get("LIFT_KERNELS_CUDA_ARCHS"):
            args.append(f"-DLIFT_KERNELS_CUDA_ARCHS={os.environ['LIFT_KERNELS_CUDA_ARCHS']}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    version=read_version(),
    ext_modules=[CMakeExtension("lift_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
